"""Native orchestrator: the whole chain on one machine, stage by stage."""
