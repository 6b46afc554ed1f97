"""Stage code of the example ETL pipeline (pipelines/etl.toml)."""
