"""The model: its config, megatron-core layers, the Llama decoder and its pipeline stages, and the
plain-torch decoder used for generation. Nothing here knows how ranks are laid out beyond what
megatron-core's `parallel_state` says."""
