"""Model manifests: one JSON file per preset (Hugging Face repo, revision, file, license)."""
