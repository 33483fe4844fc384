"""JSON Schema of manifest.json and example manifests (shipped as package data)."""
