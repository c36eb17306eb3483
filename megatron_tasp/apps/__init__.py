"""Applications: CLI commands, drawing, benchmarks, cost model, fine-tuning."""
