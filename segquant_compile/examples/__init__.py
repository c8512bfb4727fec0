"""Example models, apart from the backend: the real MNIST DiT and ViT and the terrain UNet (weights
in ../shared/data), the demo's SD3-style transformer, and the shipped diffusers architectures
(`models`: configs built on the meta device, the tiny PixArt pipeline). The CLI, the demo, the
benches and the tests use them; the backend never imports them (an import-linter contract)."""
