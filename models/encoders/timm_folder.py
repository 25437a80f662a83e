"""A timm model saved as a folder: `config.json` (with `architecture`) and `model.safetensors` or
`pytorch_model.bin`, as `timm.models.save_for_hf` writes it or a hub snapshot copied from a machine
with a network. Loaded through timm's `local-dir:` source, so no hub is asked."""
import json
from pathlib import Path

from models.encoders.base import EncoderFamily, file_identity, package_version
from models.encoders.vision import TimmImageEncoder


class TimmFolderEncoder(TimmImageEncoder):
    def __init__(self, folder: str, tokens: int = 4):
        super().__init__(f"local-dir:{folder}", None, tokens)
        self.folder = folder

    @property
    def identity(self) -> dict:
        return timm_folder_identity(self.folder, self.tokens)


def timm_folder_identity(folder: str, tokens: int) -> dict:
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"timm-dir: {config} not found (a folder written by timm.models.save_for_hf)")
    pretrained = json.loads(config.read_text()).get("pretrained_cfg", {})
    return {"family": "timm-dir", "weights": file_identity(folder), "size": pretrained.get("input_size", [0])[-1],
            "tokens": tokens, "timm": package_version("timm"), "torch": package_version("torch")}


FAMILIES = {
    "timm-dir": EncoderFamily("image", TimmFolderEncoder, timm_folder_identity, "timm-dir:FOLDER",
                              "a timm model saved as a folder (`config.json` + weights, as "
                              "`timm.models.save_for_hf` writes it)"),
}
