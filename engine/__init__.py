"""A minimal MLX paged-KV inference engine with automatic prefix caching."""
