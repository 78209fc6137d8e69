"""Running on devices: the mesh, multi-process (multi-host) runs, and config files onto validated settings."""
