"""GPU benchmarks. Each writes a JSON record (command, machine, every figure) under results/."""
