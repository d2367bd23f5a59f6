"""rvlm: recursive vision-language models in JAX/Flax."""
import setuptools

setuptools.setup(
    name="rvlm",
    version="0.1.0",
    description="Recursive vision-language models (RecursiveVLM) in JAX/Flax.",
    packages=setuptools.find_packages(include=["rvlm", "rvlm.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "tensorflow-datasets>=4.9.10",
        "array-record>=0.8.6",
        "clu>=0.0.12",
        "tensorboardX>=2.6.5",
        "numpy>=2.0",
        "pillow>=10.0",
        "sentencepiece>=0.2.0",
        "tokenizers>=0.20",
        "matplotlib>=3.8",
        "absl-py>=2.0",
    ],
    extras_require={
        # xdist: the README's test command runs two workers (one per core of a CI machine).
        "test": ["pytest>=8.0", "pytest-xdist>=3.5"],
        # An independent reference framework for numerical parity tests.
        "oracle": ["torch==2.13.0", "transformers>=5.0", "safetensors>=0.4"],
    },
)
