"""Classic YOLOv5 checkpoints (the ultralytics/yolov5 repository), run without its code.

Such a checkpoint pickles ``models.yolo.DetectionModel`` together with its architecture
(``model.yaml``). :func:`napari_yolocell.models.safety.safe_load` reads it with inert
stand-ins for the repository's classes; :func:`build` then rebuilds the network from the YAML
(backbone and neck from ultralytics' module zoo, whose ``Conv``/``C3``/``Bottleneck``/``Concat``
have the same parameters and names) with the anchor-based head written here, and loads the
checkpoint's state dict into it.

:class:`ObjectnessToScores` turns the ``(N, anchors, 5 + nc)`` output of anchor-based heads
(box, objectness, class scores) into the ``(N, 4 + nc, anchors)`` layout of ultralytics'
heads, scores = objectness x class score (what yolov5's and meituan's NMS threshold), so the
engine, the exports and the post-processing are shared by every family.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from napari_yolocell.models.ultralytics_env import import_ultralytics


def _ul():
    """``ultralytics.nn.modules``, imported offline."""
    import_ultralytics()
    import ultralytics.nn.modules as modules

    return modules


class ObjectnessToScores(nn.Module):
    """Wrap a network whose output is ``(N, A, 5 + nc)`` to output ``(N, 4 + nc, A)``.

    Attributes ``names`` and ``stride`` describe the model for exports and the engine.
    """

    def __init__(self, net: nn.Module, names: dict[int, str], stride: int) -> None:
        super().__init__()
        self.net = net
        self.names = names
        self.stride = torch.tensor([float(stride)])

    def forward(self, x):
        out = self.net(x)
        if isinstance(out, (list, tuple)):
            out = out[0]
        scores = out[..., 4:5] * out[..., 5:]
        return torch.cat([out[..., :4], scores], -1).transpose(1, 2)


class SPPF(nn.Module):
    """yolov5's SPPF (its ``cv1`` has an activation, unlike ultralytics' current SPPF)."""

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        conv = _ul().conv.Conv
        c_ = c1 // 2
        self.cv1 = conv(c1, c_, 1, 1)
        self.cv2 = conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class SPP(nn.Module):
    """yolov5's SPP: parallel max-pools of several sizes."""

    def __init__(self, c1: int, c2: int, k=(5, 9, 13)) -> None:
        super().__init__()
        conv = _ul().conv.Conv
        c_ = c1 // 2
        self.cv1 = conv(c1, c_, 1, 1)
        self.cv2 = conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList([nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k])

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class AnchorDetect(nn.Module):
    """yolov5's anchor-based head: per level a 1x1 conv to ``na * (5 + nc)`` channels, decoded
    as ``xy = (2 sigmoid - 0.5 + grid) * stride``, ``wh = (2 sigmoid)^2 * anchor``."""

    def __init__(self, nc: int, anchors, ch) -> None:
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.stride = torch.ones(self.nl)

    def forward(self, xs):
        out = []
        for i, x in enumerate(xs):
            x = self.m[i](x)
            bs, _, ny, nx = x.shape
            y = x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).sigmoid()
            yv, xv = torch.meshgrid(
                torch.arange(ny, dtype=y.dtype, device=y.device),
                torch.arange(nx, dtype=y.dtype, device=y.device),
                indexing="ij",
            )
            grid = torch.stack((xv, yv), 2).view(1, 1, ny, nx, 2) - 0.5
            stride = float(self.stride[i])
            anchor = (self.anchors[i] * stride).view(1, self.na, 1, 1, 2)
            xy = (y[..., :2] * 2 + grid) * stride
            wh = (y[..., 2:4] * 2) ** 2 * anchor
            out.append(torch.cat((xy, wh, y[..., 4:]), 4).view(bs, -1, self.no))
        return torch.cat(out, 1)


class ClassicYolov5(nn.Module):
    """The network of a ``models/yolo*.yaml`` architecture: ``model.<i>`` layers as in yolov5,
    so a yolov5 state dict loads into it unchanged."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.yaml = cfg  # the architecture, kept for the pickle-free cache
        self.model, self.save, self.froms = _parse(cfg)

    def forward(self, x):
        outputs = []
        for layer, f in zip(self.model, self.froms, strict=True):
            if f != -1:
                x = outputs[f] if isinstance(f, int) else [x if j == -1 else outputs[j] for j in f]
            x = layer(x)
            outputs.append(x)
        return x


def _make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def _parse(cfg: dict):
    """yolov5's ``parse_model`` for the modules its released architectures use."""
    ul = _ul()
    if cfg.get("activation"):
        raise ValueError(f"custom activation {cfg['activation']!r} is not supported")
    modules = {
        "Conv": ul.conv.Conv,
        "C3": ul.block.C3,
        "Bottleneck": ul.block.Bottleneck,
        "BottleneckCSP": ul.block.BottleneckCSP,
        "Focus": ul.conv.Focus,
        "SPPF": SPPF,
        "SPP": SPP,
    }
    nc, anchors = int(cfg["nc"]), cfg["anchors"]
    gd, gw = float(cfg["depth_multiple"]), float(cfg["width_multiple"])
    if isinstance(anchors, int):
        raise ValueError("auto-anchor architectures (anchors: N) are not supported")
    na = len(anchors[0]) // 2
    no = na * (nc + 5)
    layers, save, froms, ch = [], [], [], [int(cfg.get("ch", 3))]
    for i, (f, n, m, args) in enumerate(cfg["backbone"] + cfg["head"]):
        args = [{"None": None, "nc": nc, "anchors": anchors}.get(a, a) for a in args]
        n = max(round(n * gd), 1) if n > 1 else n
        if m in modules:
            c1, c2 = ch[f], args[0]
            if c2 != no:
                c2 = _make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in ("C3", "BottleneckCSP"):
                args.insert(2, n)
                n = 1
            layer = (
                nn.Sequential(*(modules[m](*args) for _ in range(n)))
                if n > 1
                else modules[m](*args)
            )
        elif m == "nn.Upsample":
            layer, c2 = nn.Upsample(*args), ch[f]
        elif m == "Concat":
            layer, c2 = ul.conv.Concat(args[0] if args else 1), sum(ch[x] for x in f)
        elif m == "Detect":
            layer = AnchorDetect(nc, anchors, [ch[x] for x in f])
            c2 = no
        else:
            raise ValueError(f"yolov5 module {m!r} (layer {i}) is not supported")
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(layer)
        froms.append(f)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save), froms


def build(ckpt: dict, path) -> tuple[nn.Module, dict[int, str], int]:
    """Network, class names and largest stride of a safely loaded classic YOLOv5 checkpoint.

    Raises
    ------
    ValueError
        No model or YAML in the checkpoint, another task, or a module not supported here.
    """
    model = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "yaml", None), dict):
        raise ValueError(f"{str(path)!r} holds no yolov5 model with its architecture")
    origin = getattr(type(model), "origin", "")
    if origin != "models.yolo.DetectionModel":
        raise ValueError(
            f"{str(path)!r} is a yolov5 {origin.rpartition('.')[2] or 'model'}, not a detection "
            "model: only detection checkpoints can count nuclei"
        )
    net = ClassicYolov5(model.yaml)
    state = {k: v.float() for k, v in model.state_dict().items()}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{str(path)!r}: the weights do not fit the stored architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    # BatchNorm eps/momentum are not in the state dict (yolov5 sets eps 1e-3): copy them
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            target = net.get_submodule(name)
            target.eps, target.momentum = float(module.eps), module.momentum
    head = net.model[-1]
    head.stride = model.stride.float().clone()
    names = getattr(model, "names", None) or [str(i) for i in range(head.nc)]
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    return net.eval(), {int(k): str(v) for k, v in names.items()}, int(head.stride.max())
