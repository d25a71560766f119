"""tf_moe: the Sparsely-Gated Mixture-of-Experts layer for Keras 3 on TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="tf_moe",
    version="0.1.0",
    description=(
        "Sparsely-Gated Mixture-of-Experts layers (Shazeer et al., ICLR 2017) "
        "for Keras 3 on TensorFlow, with sparse dispatch."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tf_moe", "tf_moe.*", "trainers", "trainers.*"]),
    # The embedded corpora (trainers/corpora/PROVENANCE.md).
    package_data={"trainers.corpora": ["*.tsv.gz", "PROVENANCE.md"]},
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.15,<4",
        "absl-py",
        "numpy",
    ],
    extras_require={
        "trainers": [
            "tensorflow-text==2.21.*",
            "tensorflow-datasets",
            "ml-collections",
            "sacrebleu",
            "tensorboard",
        ],
        "keras-hub": ["keras-hub==0.32.*"],
        "dev": [
            "pytest",
            "pytest-xdist>=3.2",  # setup.cfg: two processes, --dist worksteal
            "scipy",
            "matplotlib",  # bench/bench_lm.py's plots
            "keras-hub==0.32.*",  # tests/test_keras_hub.py
        ],
    },
)
