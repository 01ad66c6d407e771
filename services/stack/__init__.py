"""The compose stack's glue: a stage container waits for its upstream's manifest on /data, then runs its stage."""
