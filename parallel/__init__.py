"""Process groups and the three parallelisms, applied to a plain module with a mesh."""
