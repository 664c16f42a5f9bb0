"""Load a `layerforge build` output folder (a pack) into modules, without a compiler.

    pack = lf.load_pack("out/llama-3-8b")             # reads manifest.json, checks every cubin
    norm = pack.layer("rms_norm", eps=1e-5)           # LayerModule over the pack's cubin
    qkv = pack.layer("rms_norm_linear", eps=1e-5)     # a product layer: the pack's small-token kernels
    attn = pack.attention("llama_attn")               # PagedAttention (tensor-core prefill/decode)
    cache = pack.kv_cache("llama_attn", num_pages=..., max_seqs=..., max_pages_per_seq=...)

Everything a module needs comes from the manifest: each kernel's ABI (arguments, grid,
block, shared memory) and its family's fields (a layer's interface, an attention block's
heads and extra inputs, the append kernel's RoPE). Nothing here imports NVRTC or parses the
DSL. A pack for another arch, format or layerforge version, or with a missing or corrupt
cubin, is a clear `PackError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..codegen.abi import KernelABI

__all__ = ["load_pack", "Pack", "PackError"]

_ATTENTION = ("tc_attention", "wgmma_attention", "paged_attention")   # the attention kernels' families

MANIFEST_FORMAT = 2   # what runtime/build.py writes; packs of another format are refused


class PackError(RuntimeError):
    """A pack that cannot be used here (the message says why and names the file)."""


class Pack:
    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root = root
        self.manifest = manifest
        self.arch: str = manifest["arch"]
        self.dtype: str = manifest["dtype"]
        self.page_size: int = manifest["page_size"]   # format 2 always records it
        self._entries = manifest["kernels"]
        self._cubins: dict[str, bytes] = {}

    @property
    def layers(self) -> list[str]:
        """Names of the layers in the pack: row layers and product layers."""
        return sorted({e["layer"] for e in self._entries if e["family"] == "row"} | set(self._products()))

    def _products(self) -> dict[str, list[tuple[dict, dict]]]:
        """Product layer name -> (kernel entry, the layer's record) for each small-token product
        kernel serving it (a kernel for up to 8 rows and one for up to 16, per specialisation)."""
        out: dict[str, list[tuple[dict, dict]]] = {}
        for e in self._entries:
            for rec in e.get("layers", ()) if e["family"] == "gemv" else ():
                out.setdefault(rec["layer"], []).append((e, rec))
        return out

    @property
    def attention_blocks(self) -> list[str]:
        return sorted({e["layer"] for e in self._entries if e["family"] in _ATTENTION})

    # ---- modules ----------------------------------------------------------------------------
    def _select(self, entries: list[dict], name: str, dims: dict | None, consts: dict | None) -> list[dict]:
        """The entries of one specialisation of `name`: those matching the given dims and consts;
        several specialisations left (a model's norm at two widths, an attention block with two
        const sets) is an error listing them, never a silent pick."""
        want_d, want_c = dict(dims or {}), dict(consts or {})
        entries = [e for e in entries if all(e.get("dims", {}).get(k) == v for k, v in want_d.items())
                   and all(e.get("consts", {}).get(k) == v for k, v in want_c.items())]
        variants = {(tuple(sorted(e.get("dims", {}).items())), tuple(sorted(e.get("consts", {}).items(), key=str)))
                    for e in entries}
        if len(variants) > 1:
            listed = "; ".join(f"dims={dict(d)} consts={dict(c)}" for d, c in sorted(variants, key=str))
            raise PackError(f"{self.root}: {name!r} is in the pack {len(variants)} times ({listed}): pass dims= "
                            f"and/or consts= to pick one")
        return entries

    def layer(self, name: str, *, device=None, dims: dict | None = None, consts: dict | None = None,
              **scalars: Any):
        """The row or product layer `name` as a LayerModule (weights as parameters, CUDA tensors
        only). dims / consts pick one specialisation where the pack has several. A product layer
        runs the pack's small-token kernels up to 16 rows and torch's product (cuBLAS) beyond."""
        from .layers import LayerModule
        entries = [e for e in self._entries if e["family"] == "row" and e["layer"] == name]
        products = self._products().get(name)
        if not entries and products:
            records = self._select([rec for _, rec in products], name, dims, consts)
            if not records:
                raise PackError(f"{self.root}: no product layer {name!r} with dims={dims} consts={consts} in the pack")
            chosen = [(e, rec) for e, rec in products if rec in records]
            images = {e["max_m"]: (self._cubin(e), KernelABI.from_json(e["kernels"][0])) for e, _ in chosen}
            return LayerModule.from_images(name, records[0]["interface"], images, arch=self.arch, device=device,
                                           linear=records[0]["linear"], **scalars)
        if not entries:
            raise PackError(f"{self.root}: no row or product layer {name!r} in the pack "
                            f"(it has {', '.join(self.layers)})")
        entries = self._select(entries, name, dims, consts)
        if not entries:
            raise PackError(f"{self.root}: no row layer {name!r} with dims={dims} consts={consts} in the pack")
        images = {e["vec_bytes"]: (self._cubin(e), KernelABI.from_json(e["kernels"][0]), e["rows"]) for e in entries}
        return LayerModule.from_images(name, entries[0]["interface"], images, arch=self.arch, device=device,
                                       **scalars)

    def attention(self, name: str, *, dims: dict | None = None, consts: dict | None = None, **scalars: Any):
        """The attention block `name` as a PagedAttention over the pack's kernels. dims / consts
        pick one specialisation where the pack has several (e.g. Gemma-2's two windows)."""
        from .attention import PagedAttention
        entries = [e for e in self._entries if e["family"] in (*_ATTENTION, "block_mask") and e["layer"] == name]
        if not entries:
            raise PackError(f"{self.root}: no attention block {name!r} in the pack "
                            f"(it has {', '.join(self.attention_blocks) or 'none'})")
        entries = self._select(entries, name, dims, consts)
        if not entries:
            raise PackError(f"{self.root}: no attention block {name!r} with dims={dims} consts={consts} in the pack")
        images = {}
        for e in entries:
            if e["family"] == "block_mask":   # the prefill's pre-pass: its tiling and key
                images["block_mask"] = (self._cubin(e), (KernelABI.from_json(e["kernels"][0]),),
                                        (e["rows"], e["keys"], e["heads"], e["key"]))
                continue
            mode = e.get("mode") if e["family"] != "paged_attention" else None   # tc / wgmma: by mode
            keys = e["tiles"]["keys"] if mode else None   # the CUDA-core kernel has no key tile
            images[mode] = (self._cubin(e), tuple(KernelABI.from_json(k) for k in e["kernels"]), keys)
        module = PagedAttention.from_images(name, entries[0]["interface"], images, page_size=entries[0]["page_size"],
                                            arch=self.arch, kv_dtype=self.manifest.get("kv_cache"), **scalars)
        module.rope = _rope_spec(entries[0]["interface"]["rope"])   # what the cache's append needs
        return module

    def kv_cache(self, name: str, *, num_pages: int, max_seqs: int, max_pages_per_seq: int, device=None,
                 scales: str = "per_tensor"):
        """A PagedKVCache for attention block `name`, appending through the pack's kernel (an e4m3
        cache with `scales` when the pack was built with `--kv-cache fp8_e4m3`)."""
        from .kv_cache import PagedKVCache, register_append_kernel
        info = next((e["interface"] for e in self._entries if e.get("layer") == name and "interface" in e
                     and e["family"] != "row"), None)
        if info is None:
            raise PackError(f"{self.root}: no attention block {name!r} in the pack")
        for e in self._entries:
            if e["family"] == "kv_append":
                register_append_kernel(e["key"], self._cubin(e), KernelABI.from_json(e["kernels"][0]))
        return PagedKVCache(num_pages, self.page_size, info["num_kv_heads"], info["head_dim"], info["dtype"],
                            device if device is not None else torch.device("cuda", torch.cuda.current_device()),
                            max_seqs, max_pages_per_seq, arch=self.arch, kv_dtype=self.manifest.get("kv_cache"),
                            scales=scales)

    # ---- files ------------------------------------------------------------------------------
    def _cubin(self, entry: dict) -> bytes:
        key = entry["key"]
        if key not in self._cubins:
            path = self.root / entry["cubin"]
            try:
                data = path.read_bytes()
            except OSError as e:
                raise PackError(f"{path}: the pack's cubin for {key} cannot be read ({e.strerror})") from None
            if hashlib.sha256(data).hexdigest() != entry["cubin_sha256"]:
                raise PackError(f"{path}: the cubin for {key} does not match the manifest's checksum "
                                f"(corrupt or replaced); rebuild the pack")
            self._cubins[key] = data
        return self._cubins[key]

    def check_device(self, device=None) -> None:
        """Raise PackError unless the GPU runs this pack's cubins (same compute capability)."""
        from .launch import device_arch
        have = device_arch(device)
        if have != self.arch.rstrip("af"):
            raise PackError(f"{self.root}: the pack was built for {self.arch}, this GPU is {have}; "
                            f"rebuild with `layerforge build --arch {have}`")


def load_pack(path: str | Path, *, check_device: bool = True) -> Pack:
    """Open a pack and check it: its format and layerforge version, every cubin against its
    checksum, and (with a GPU, unless check_device=False) the arch."""
    root = Path(path)
    mpath = root / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise PackError(f"{mpath}: no manifest; is {root} a `layerforge build` output folder?") from None
    except json.JSONDecodeError as e:
        raise PackError(f"{mpath}: not valid JSON ({e})") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise PackError(f"{mpath}: pack format {manifest.get('format')!r}, this layerforge reads {MANIFEST_FORMAT}; "
                        f"rebuild the pack")
    if manifest.get("layerforge") != __version__:
        raise PackError(f"{mpath}: built by layerforge {manifest.get('layerforge')}, this is {__version__}; "
                        f"rebuild the pack (kernel ABIs may differ between versions)")
    pack = Pack(root, manifest)
    for entry in pack._entries:
        pack._cubin(entry)
    if check_device and torch.cuda.is_available():
        pack.check_device()
    return pack


def _rope_spec(desc: dict | None):
    if desc is None:
        return None
    from ..dsl.ir import RopeSpec
    from ..dsl.numerics import rope_scaling_from_json
    scaling = rope_scaling_from_json(desc.get("scaling"))
    return RopeSpec(theta=desc["theta"], style=desc["style"], rotary_dim=desc["rotary_dim"], scaling=scaling)
