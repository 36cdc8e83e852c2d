"""The per-host daemon: control API, slot supervisor, deploy pipeline."""
