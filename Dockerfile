# spec2vol BIDS-App image: PyTorch with CUDA, mamba-ssm and causal-conv1d compiled from source.
#
#   docker build -t spec2vol:0.1.0 --build-arg IMAGE_TAG=spec2vol:0.1.0 .
#   docker run --rm --gpus all -v /data:/data:ro -v /out:/out spec2vol:0.1.0 /data /out participant
#
# Everything is installed at build time; nothing is downloaded when a container starts.

# The devel flavour ships nvcc, which the CUDA extensions below need to compile.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG IMAGE_TAG=spec2vol:latest
ARG BUILD_DATE=unknown
ARG VCS_REF=unknown
ARG MAMBA_SSM_VERSION=2.2.4
ARG CAUSAL_CONV1D_VERSION=1.5.0.post8
# Volta, Turing, Ampere (A100, A40/RTX 30xx), Ada (L4/L40, RTX 40xx), Hopper (H100/H200).
ARG TORCH_CUDA_ARCH_LIST="7.0;7.5;8.0;8.6;8.9;9.0"
ARG MAX_JOBS=4

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Build tools the extensions need with --no-build-isolation (they compile against the torch
# already in the image instead of downloading another one into an isolated build env).
RUN python -m pip install packaging ninja wheel setuptools einops

# The *_FORCE_BUILD flags make both setup.py files compile here instead of downloading a
# prebuilt wheel from their GitHub releases; *_SKIP_CUDA_BUILD must not be TRUE or the CUDA
# kernels would be left out. --no-binary keeps pip from taking a wheel from the index either.
RUN env -u MAMBA_SKIP_CUDA_BUILD -u CAUSAL_CONV1D_SKIP_CUDA_BUILD \
        MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
        python -m pip install --no-build-isolation --no-binary causal-conv1d,mamba-ssm \
            "causal-conv1d==${CAUSAL_CONV1D_VERSION}" && \
    env -u MAMBA_SKIP_CUDA_BUILD -u CAUSAL_CONV1D_SKIP_CUDA_BUILD \
        MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS="${MAX_JOBS}" \
        python -m pip install --no-build-isolation --no-binary causal-conv1d,mamba-ssm \
            "mamba-ssm==${MAMBA_SSM_VERSION}" && \
    python -c "import torch, selective_scan_cuda, causal_conv1d_cuda; print('CUDA extensions built for', torch.version.cuda)"

# The package itself (its dependencies come from PyPI at build time).
COPY pyproject.toml README.md LICENSE /tmp/spec2vol/
COPY spec2vol_bids /tmp/spec2vol/spec2vol_bids
RUN python -m pip install "/tmp/spec2vol" && rm -rf /tmp/spec2vol && \
    python -c "import spec2vol_bids; print(spec2vol_bids.__version__)" > /version && \
    test "$(cat /version)" = "${VERSION}"

# The default standard space's brain mask and T1w (the reports' background), so template-space
# runs need no network: TemplateFlow reads them from TEMPLATEFLOW_HOME and downloads nothing
# that is already there.
ENV TEMPLATEFLOW_HOME=/opt/templateflow
RUN python -c "import templateflow.api as tf; tf.get('MNI152NLin2009cAsym', resolution=2, desc='brain', suffix='mask', extension='.nii.gz'); tf.get('MNI152NLin2009cAsym', resolution=2, desc=None, suffix='T1w', extension='.nii.gz')" && \
    chmod -R a+rX /opt/templateflow

# Run as an unprivileged user whose HOME is writable (Docker); caches go to /tmp so a
# read-only image or a different --user still works.
RUN useradd --create-home --home-dir /home/spec2vol --uid 1000 --shell /bin/bash spec2vol && \
    chmod 1777 /home/spec2vol

ENV HOME=/home/spec2vol \
    PYTHONNOUSERSITE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    MPLBACKEND=Agg \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    NUMBA_CACHE_DIR=/tmp/.numba \
    MNE_DONTWRITE_HOME=true \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SPEC2VOL_CONTAINER_TYPE=docker \
    SPEC2VOL_CONTAINER_TAG=${IMAGE_TAG}

LABEL org.opencontainers.image.title="spec2vol" \
      org.opencontainers.image.description="BIDS-App: EEG-to-fMRI synthesis with Spec2VolCAMU-Net" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/spec2vol/spec2vol" \
      org.opencontainers.image.ref.name="${IMAGE_TAG}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

USER spec2vol
WORKDIR /home/spec2vol
ENTRYPOINT ["spec2vol"]
CMD ["--help"]
