"""Distribution `seekv4`: the repository's top-level folders become the `seekv4` package and its sub-packages."""
from setuptools import setup
from setuptools.command.build_py import build_py

SUBPACKAGES = ["configuration", "modeling", "tokenization", "eval", "eval/metrics", "eval/lm_eval_tasks"] + [
    f"eval/metrics/{m}" for m in ("code_exact_match", "edit_similarity", "needle_accuracy", "bucket_perplexity",
                                        "api_recall")]


class BuildPy(build_py):
    """The package root is the repository root: keep this file out of the installed package."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [m for m in modules if not (package == "seekv4" and m[1] == "setup")]


setup(
    name="seekv4",
    version="0.1.0",
    description="Hugging Face-native DeepSeek-V4 family of sparse language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["seekv4"] + [f"seekv4.{name.replace('/', '.')}" for name in SUBPACKAGES],
    package_dir={"seekv4": ".", **{f"seekv4.{name.replace('/', '.')}": name for name in SUBPACKAGES}},
    package_data={"seekv4.eval": ["data/*.jsonl", "data/*.json"], "seekv4.eval.lm_eval_tasks": ["*.yaml"],
                  "seekv4.modeling": ["*.c"]},  # the fused indexer kernel is compiled from source on first use
    install_requires=[
        "torch>=2.6",
        "transformers>=5.0,<6",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout", "datasets>=3", "evaluate>=0.4", "rapidfuzz>=3", "matplotlib",
                 "lm-eval>=0.4.13", "peft>=0.15", "bitsandbytes>=0.50", "hypothesis>=6.100"],
        "train": ["peft>=0.15", "datasets>=3"],
        "eval": ["datasets>=3", "evaluate>=0.4", "rapidfuzz>=3", "matplotlib", "gguf>=0.10"],
        "lm-eval": ["lm-eval>=0.4.13"],
    },
    cmdclass={"build_py": BuildPy},
    entry_points={"console_scripts": ["seekv4=seekv4.cli:main"]},
)
