"""xray_pretrain: high-definition X-ray MAE pre-training (see README.md)."""

from setuptools import find_packages, setup

setup(
    name="xray_pretrain",
    version="0.1.0",
    description="DICOM/PNG/JPEG X-ray archives -> WebDataset shards -> DeepSpeed ViT-MAE at 1280^2",
    python_requires=">=3.10",
    packages=find_packages(include=["xray_core*", "xray_pretrain*", "data_tools*"]),
    include_package_data=True,
    package_data={"xray_pretrain": ["configs/*.yaml", "configs/deepspeed/*.json"]},
    install_requires=[
        # The torch wheel is a cu130 build; DALI must match that CUDA major.
        "torch==2.14.1",
        "torchvision==0.29.1",
        "deepspeed==0.19.8",
        "nvidia-dali-cuda130==2.4.0",
        "timm>=1.0",
        "safetensors>=0.4",
        "webdataset>=0.2.100",
        "pydicom>=3.0",
        # pydicom pixel-data plugins: JPEG (baseline/extended/lossless), JPEG-LS, JPEG 2000, RLE.
        "pylibjpeg>=2.0",
        "pylibjpeg-libjpeg>=2.1",
        "pylibjpeg-openjpeg>=2.3",
        "pylibjpeg-rle>=2.0",
        "numpy",
        "pillow>=10",
        "scipy",
        "pyyaml",
        "tensorboard",
        "tqdm",
        # downstream metrics (AUROC, AP, F1) are computed with scikit-learn's implementations
        "scikit-learn>=1.3",
        # Report metrics: BLEU, METEOR (bundled jar; needs a Java runtime), ROUGE-L, CIDEr-D.
        "pycocoevalcap==1.2",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "ruff>=0.6",
            "hypothesis>=6.100",
            "transformers>=5",
            "psutil",
        ],
        # Report clinical efficacy with user-supplied CheXbert weights (report.chexbert).
        "clinical": ["transformers>=5"],
    },
    entry_points={
        "console_scripts": [
            "xray-pretrain=xray_pretrain.cli:main",
            "xray-shard=data_tools.cli:main",
        ]
    },
)
