"""Everything that touches MLX arrays: the paged KV pool and the model runner."""
