"""Hardware probe, model profiles, memory model and offload planning (pure core: no CLI, no printing)."""
