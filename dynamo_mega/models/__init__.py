"""Model-family knowledge: HF config -> Megatron config/spec, and HF <-> Megatron tensor names and layouts."""
