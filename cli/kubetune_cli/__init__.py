"""The `kubetune` command line: local runs, cluster users, CRD generation."""
