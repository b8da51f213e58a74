"""params.yaml as typed models: one module per top-level section (a YAML key is a field of the same name), and the loader."""
