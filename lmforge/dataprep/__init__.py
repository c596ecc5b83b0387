"""The data pipeline: raw scraped text to clean, deduplicated, private token shards (issue 6)."""
