"""The body phantom: a procedural abdomen with organs, bone, texture and lesions.

:func:`_body_params` draws one patient; :func:`body_phantom` paints the slice of it
at a given level, so the slices of a case (same seed) show the same anatomy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ldct_node.lab.simulation.phantoms.canvas import LABELS, Blob, Canvas
from ldct_node.lab.simulation.phantoms.objects import Lesion, Phantom

logger = logging.getLogger(__name__)


def _textures(
    rng: np.random.Generator, size: int, spacing: float, slice_z: float
) -> dict[str, np.ndarray]:
    """Unit-variance correlated noise fields that change smoothly with ``slice_z``.

    Each scale mixes two independent fields as cos(z/L) A + sin(z/L) B, which keeps the
    variance and gives a correlation length L along z.
    """
    scales = {"fine": (0.6, 1.5), "medium": (2.0, 4.0), "coarse": (6.0, 12.0)}
    fields: dict[str, np.ndarray] = {}
    for name, (sigma_mm, length_z) in scales.items():
        pair = []
        for _ in range(2):
            white = rng.standard_normal((size, size)).astype(np.float32)
            smooth = ndimage.gaussian_filter(white, max(sigma_mm / spacing, 0.5), mode="wrap")
            pair.append(smooth / max(float(smooth.std()), 1e-6))
        phase = slice_z / length_z
        fields[name] = (math.cos(phase) * pair[0] + math.sin(phase) * pair[1]).astype(np.float32)
    return fields


def _bump(level: float, centre: float, half_extent: float) -> float:
    """Cross-section scale of an organ spanning centre +- half_extent along z (0 outside)."""
    u = (level - centre) / half_extent
    return math.sqrt(1.0 - u * u) if abs(u) < 1.0 else 0.0


def _harmonics(rng: np.random.Generator, amplitude: float) -> tuple[tuple[int, float, float], ...]:
    amps = rng.uniform(-amplitude, amplitude, size=3)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=3)
    return tuple((k, float(a), float(p)) for k, a, p in zip((2, 3, 4), amps, phases, strict=True))


def _body_params(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one patient: sizes, positions, tissue HU and lesions.

    The number and order of draws never depends on anything but ``rng``, so the slices
    of one case (same seed, different ``slice_z``) show the same anatomy.
    """
    u = rng.uniform
    a = u(140.0, 185.0)
    b = min(u(95.0, 135.0), 0.85 * a)
    enhanced = u() < 0.85
    e = u(0.7, 1.0) if enhanced else 0.0
    p: dict[str, Any] = {
        "a": a,
        "b": b,
        "outline": _harmonics(rng, 0.03),
        "width_phase": u(0.0, 2.0 * math.pi),
        "fat": u(8.0, 35.0),
        "wall": u(6.0, 14.0),
        "level0": u(-40.0, 40.0),
        "enhancement": e,
        "fov_margin": u(10.0, 30.0),
        "hu": {
            "skin": u(10.0, 40.0),
            "fat": u(-115.0, -85.0),
            "muscle": u(40.0, 60.0),
            "liver": u(50.0, 65.0) + 40.0 * e,
            "spleen": u(40.0, 50.0) + 60.0 * e,
            "kidney": u(25.0, 35.0) + 140.0 * e,
            "aorta": u(35.0, 45.0) + u(150.0, 210.0) * e,
            "vein": u(35.0, 45.0) + u(100.0, 160.0) * e,
            "cortical": u(900.0, 1200.0),
            "trabecular": u(180.0, 350.0),
            "csf": u(0.0, 15.0),
            "disc": u(70.0, 100.0),
            "bowel_wall": u(30.0, 50.0) + 30.0 * e,
            "fluid": u(0.0, 20.0),
            "oral_contrast": u(150.0, 300.0),
            "lung": u(-870.0, -820.0),
        },
        "texture_hu": {
            "fat": u(5.0, 12.0),
            "muscle": u(4.0, 8.0),
            "organ": u(3.0, 8.0),
            "trabecular": u(50.0, 100.0),
        },
        "vb": (u(18.0, 24.0), u(14.0, 18.0)),
        "disc_phase": u(0.0, 32.0),
        "aorta": (u(3.0, 15.0), u(10.0, 13.0)),
        "ivc": (u(20.0, 30.0), u(9.0, 13.0), u(6.0, 9.0)),
        "paraspinal": (u(28.0, 36.0), u(22.0, 30.0), u(20.0, 28.0)),
        "psoas": u(14.0, 20.0),
        "liver": {
            "blob": Blob(
                -a * u(0.35, 0.45),
                -b * u(0.05, 0.2),
                a * u(0.42, 0.52),
                b * u(0.55, 0.7),
                u(-0.3, 0.3),
                _harmonics(rng, 0.08),
            ),
            "z": (u(30.0, 60.0), u(110.0, 140.0)),
        },
        "spleen": {
            "blob": Blob(
                a * u(0.5, 0.6),
                b * u(0.2, 0.4),
                u(40.0, 60.0),
                u(22.0, 32.0),
                u(-0.9, -0.4),
                _harmonics(rng, 0.06),
            ),
            "z": (u(30.0, 70.0), u(50.0, 70.0)),
        },
        "gallbladder": (u() < 0.6, u(0.2, 0.4), u(0.4, 0.6), u(12.0, 18.0), u(20.0, 30.0)),
        "gallbladder_z": (u(-20.0, 20.0), u(30.0, 45.0)),
        "lung_start": u(40.0, 90.0),
    }
    # The spine hangs from the back: paraspinal muscles touch the subcutaneous fat.
    p["spine_y"] = b - p["fat"] - p["paraspinal"][2] - p["vb"][1] - 22.0
    kidneys = []
    for side in (-1.0, 1.0):
        kidneys.append(
            {
                "side": side,
                "dx": u(32.0, 45.0),
                "dy": u(-5.0, 10.0),
                "size": (u(22.0, 28.0), u(28.0, 35.0)),
                "angle": side * u(0.3, 0.7),
                # the right kidney (image left) sits lower
                "z": (u(-30.0, 0.0) - (10.0 if side < 0 else 0.0), u(50.0, 65.0)),
            }
        )
    p["kidneys"] = kidneys
    p["hepatic_vessels"] = [
        (math.sqrt(u()) * 0.7, u(0.0, 2.0 * math.pi), u(3.0, 7.0), u(-60.0, 60.0), u(30.0, 80.0))
        for _ in range(6)
    ]
    content = ("gas", "fluid", "contrast")
    p["bowel"] = [
        {
            # normalised position in the abdominal cavity, mostly anterior
            "rho": math.sqrt(u()) * 0.85,
            "phi": u(-math.pi - 0.4, 0.4),
            "r": u(9.0, 22.0),
            "squash": u(0.6, 1.0),
            "angle": u(0.0, math.pi),
            "z": (u(-80.0, 80.0), u(30.0, 80.0)),
            "content": content[int(rng.choice(3, p=[0.3, 0.5, 0.2]))],
        }
        for _ in range(14)
    ]
    p["ribs"] = [
        {
            "side": side,
            "phi": u(-math.radians(60.0), math.radians(75.0)),
            "start": u(-50.0, 30.0),
            "size": (u(4.0, 6.0), u(7.0, 11.0)),
        }
        for side in (-1.0, 1.0)
        for _ in range(6)
    ]
    organs = ("liver", "spleen", "kidney_left", "kidney_right")
    n_lesions = int(rng.integers(3, 9))
    lesions = []
    for i in range(8):
        organ = organs[int(rng.choice(4, p=[0.55, 0.15, 0.15, 0.15]))]
        lesions.append(
            {
                "active": i < n_lesions,
                "organ": organ,
                "rho": math.sqrt(u()) * 0.6,
                "theta": u(0.0, 2.0 * math.pi),
                "z": u(-20.0, 20.0),
                "diameter": u(3.0, 20.0),
                "contrast": (1.0 if u() < 0.5 else -1.0) * u(5.0, 20.0),
            }
        )
    p["lesions"] = lesions
    return p


def body_phantom(
    size: int,
    rng: np.random.Generator,
    slice_z: float,
    fov_mm: float | None,
    with_lesions: bool,
) -> Phantom:
    """The slice at ``slice_z`` of the patient ``rng`` draws.

    See :func:`~ldct_node.lab.simulation.phantoms.make_phantom`.
    """
    p = _body_params(rng)
    a, b, hu, th = p["a"], p["b"], p["hu"], p["texture_hu"]
    # Whole millimetres, as scanners offer: pixel spacings stay short decimals.
    auto_fov = float(round(min(max(2.0 * (a + p["fov_margin"]), 340.0), 420.0)))
    fov = float(fov_mm) if fov_mm is not None else auto_fov
    spacing = fov / size
    tex = _textures(rng, size, spacing, slice_z)
    level = p["level0"] + slice_z
    c = Canvas(size, spacing, -1000.0)

    # Outline, subcutaneous fat, abdominal wall, visceral fat.
    width = 1.0 + 0.04 * math.sin(level / 150.0 + p["width_phase"])
    outline = Blob(0.0, 0.0, a * width, b * width, 0.0, p["outline"])
    c.paint(outline, hu["skin"], "skin")
    c.paint(outline.shrunk(1.5), hu["fat"], "fat", tex["medium"], th["fat"])
    c.paint(outline.shrunk(p["fat"]), hu["muscle"], "muscle", tex["medium"], th["muscle"])
    c.paint(outline.shrunk(p["fat"] + p["wall"]), hu["fat"], "fat", tex["medium"], th["fat"])

    # Lung bases behind the liver and spleen dome.
    lung_scale = math.sqrt(min(max((level - p["lung_start"]) / 60.0, 0.0), 1.0))
    if lung_scale > 0:
        for side in (-1.0, 1.0):
            lung = Blob(side * a * 0.45, b * 0.35, a * 0.3 * lung_scale, b * 0.45 * lung_scale)
            c.paint(lung, hu["lung"], "lung", tex["medium"], 20.0)
        # small vessels: bright spots where the fine field peaks
        spots = np.clip(tex["fine"] - 2.2, 0.0, 0.6) / 0.6 * 700.0
        lung_px = c.labels == LABELS["lung"]
        c.image[lung_px] += spots[lung_px]

    # Bowel loops: wall, then gas, fluid or oral contrast.
    for loop in p["bowel"]:
        s = _bump(level, *loop["z"])
        if s <= 0.2:
            continue
        cav_a = max(a * width - p["fat"] - p["wall"] - loop["r"], 1.0)
        cav_b = max(b * width - p["fat"] - p["wall"] - loop["r"], 1.0)
        lx = loop["rho"] * cav_a * math.cos(loop["phi"])
        ly = loop["rho"] * cav_b * math.sin(loop["phi"])
        wall = Blob(lx, ly, loop["r"], loop["r"] * loop["squash"], loop["angle"])
        c.paint(wall, hu["bowel_wall"], "bowel", tex["medium"], th["organ"])
        lumen = wall.shrunk(3.0)
        if loop["content"] == "gas":
            c.paint(lumen, -1000.0, "gas")
        elif loop["content"] == "fluid":
            c.paint(lumen, hu["fluid"], "bowel")
        else:
            c.paint(lumen, hu["oral_contrast"], "bowel")

    # Spine region: paraspinal muscles and psoas first, bone later.
    sy = p["spine_y"]
    vba, vbb = p["vb"]
    px_, pa, pb = p["paraspinal"]
    for side in (-1.0, 1.0):
        para = Blob(side * px_, sy + vbb + 22.0, pa, pb)
        c.paint(para, hu["muscle"], "muscle", tex["medium"], th["muscle"])
        psoas_r = p["psoas"] * min(max(0.4 - level / 150.0, 0.3), 1.0)
        psoas = Blob(side * (vba + psoas_r * 0.8), sy - 3.0, psoas_r, psoas_r * 1.1)
        c.paint(psoas, hu["muscle"], "muscle", tex["medium"], th["muscle"])

    # Ribs in the body wall.
    ring_a = a * width - p["fat"] - p["wall"] * 0.5
    ring_b = b * width - p["fat"] - p["wall"] * 0.5
    for rib in p["ribs"]:
        if level < rib["start"]:
            continue
        phi = rib["phi"] if rib["side"] > 0 else math.pi - rib["phi"]
        rx, ry = ring_a * math.cos(phi), ring_b * math.sin(phi)
        tangent = math.atan2(ring_b * math.cos(phi), -ring_a * math.sin(phi))
        cortex = Blob(rx, ry, rib["size"][1], rib["size"][0], tangent)
        c.paint(cortex, hu["cortical"], "bone")
        c.paint(cortex.shrunk(1.8), hu["trabecular"], "marrow", tex["fine"], th["trabecular"])

    # Kidneys with renal sinus fat.
    kidney_blobs: dict[str, Blob] = {}
    for k in p["kidneys"]:
        s = _bump(level, *k["z"])
        if s <= 0.15:
            continue
        kb = Blob(
            k["side"] * (vba + k["dx"]),
            sy + k["dy"],
            k["size"][0] * s,
            k["size"][1] * s,
            k["angle"],
        )
        c.paint(kb, hu["kidney"], "kidney", tex["medium"], th["organ"])
        sinus = Blob(
            kb.cx - k["side"] * kb.a * 0.45, kb.cy - kb.b * 0.1, kb.a * 0.35, kb.b * 0.4, kb.angle
        )
        c.paint(sinus, hu["fat"], "fat", tex["medium"], th["fat"])
        # image left is the patient's right
        kidney_blobs["kidney_right" if k["side"] < 0 else "kidney_left"] = kb

    # Spleen, liver with hepatic vessels and gallbladder.
    organ_blobs: dict[str, Blob] = dict(kidney_blobs)
    s = _bump(level, *p["spleen"]["z"])
    if s > 0.15:
        spleen = p["spleen"]["blob"].scaled(s)
        c.paint(spleen, hu["spleen"], "spleen", tex["medium"], th["organ"])
        organ_blobs["spleen"] = spleen
    s = _bump(level, *p["liver"]["z"])
    if s > 0.15:
        liver = p["liver"]["blob"].scaled(s)
        c.paint(liver, hu["liver"], "liver", tex["medium"], th["organ"])
        organ_blobs["liver"] = liver
        for rho, ang, r, zc, half in p["hepatic_vessels"]:
            if _bump(level, zc, half) <= 0:
                continue
            vx, vy = _organ_point(liver, rho, ang)
            c.paint(Blob(vx, vy, r, r), hu["vein"], "vessel")
        gb_on, gx, gy, gr_a, gr_b = p["gallbladder"]
        gs = _bump(level, *p["gallbladder_z"])
        if gb_on and gs > 0.2:
            gb = Blob(liver.cx + liver.a * gx, liver.cy + liver.b * gy, gr_a * gs, gr_b * gs, 0.4)
            c.paint(gb, hu["fluid"], "fluid")

    # Great vessels in front of the spine.
    ax_, ar = p["aorta"]
    c.paint(Blob(ax_, sy - vbb - ar - 2.0, ar, ar), hu["aorta"], "vessel")
    ix, ia, ib = p["ivc"]
    c.paint(Blob(-ix, sy - vbb - ib - 2.0, ia, ib), hu["vein"], "vessel")

    # Vertebra: body (or disc), arch, canal, spinous and transverse processes.
    dz = (level + p["disc_phase"]) % 32.0 - 3.5
    bone_part = min(max((abs(dz) - 2.5) / 2.0, 0.0), 1.0)
    vb = Blob(0.0, sy, vba, vbb)
    in_bone = bone_part >= 0.5
    shell = hu["disc"] + bone_part * (hu["cortical"] - hu["disc"])
    c.paint(vb, shell, "bone" if in_bone else "disc")
    inner = hu["disc"] + bone_part * (hu["trabecular"] - hu["disc"])
    texture_hu = th["trabecular"] * bone_part
    c.paint(vb.shrunk(1.8), inner, "marrow" if in_bone else "disc", tex["fine"], texture_hu)
    canal_y = sy + vbb + 9.0
    c.paint(Blob(0.0, canal_y, 14.0, 12.0), hu["cortical"], "bone")
    c.paint(Blob(0.0, sy + vbb + 27.0, 5.0, 13.0), hu["cortical"], "bone")
    for side in (-1.0, 1.0):
        c.paint(Blob(side * 24.0, canal_y - 2.0, 13.0, 4.5, side * 0.25), hu["cortical"], "bone")
    c.paint(Blob(0.0, canal_y, 8.0, 7.0), hu["csf"], "csf")

    # Low-contrast lesions (spheres) inside their organs.
    lesions: list[Lesion] = []
    for les in p["lesions"]:
        organ_key = les["organ"]
        if not with_lesions or not les["active"] or organ_key not in organ_blobs:
            continue
        half = les["diameter"] / 2.0
        dz_les = slice_z - les["z"]
        if abs(dz_les) >= half:
            continue
        r_mm = math.sqrt(half * half - dz_les * dz_les)
        if r_mm < 0.5 * spacing:
            continue
        lx, ly = _organ_point(organ_blobs[organ_key], les["rho"], les["theta"])
        label = "kidney" if organ_key.startswith("kidney") else organ_key
        if c.add_within(Blob(lx, ly, r_mm, r_mm), les["contrast"], label):
            lesions.append(
                Lesion(
                    row=ly / spacing + c.centre,
                    col=lx / spacing + c.centre,
                    radius_px=r_mm / spacing,
                    diameter_mm=les["diameter"],
                    contrast_hu=les["contrast"],
                    organ=label,
                )
            )

    masks = _body_masks(c, lesions)
    params = {
        "half_width_mm": a,
        "half_depth_mm": b,
        "fov_mm": fov,
        "level_mm": level,
        "enhancement": p["enhancement"],
    }
    return Phantom(
        image=c.image,
        pixel_spacing_mm=spacing,
        kind="body",
        slice_z_mm=float(slice_z),
        masks=masks,
        lesions=tuple(lesions),
        params=params,
    )


def _organ_point(blob: Blob, rho: float, theta: float) -> tuple[float, float]:
    """Point at normalised radius ``rho`` and angle ``theta`` inside an ellipse."""
    u, v = rho * blob.a * math.cos(theta), rho * blob.b * math.sin(theta)
    ca, sa = math.cos(blob.angle), math.sin(blob.angle)
    return blob.cx + u * ca - v * sa, blob.cy + u * sa + v * ca


def _body_masks(c: Canvas, lesions: Sequence[Lesion]) -> dict[str, np.ndarray]:
    lab = c.labels

    def any_of(*names: str) -> np.ndarray:
        return np.isin(lab, [LABELS[n] for n in names])

    masks = {
        "air": lab == LABELS["air"],
        "body": lab != LABELS["air"],
        "fat": lab == LABELS["fat"],
        "muscle": lab == LABELS["muscle"],
        "soft_tissue": any_of("muscle", "liver", "spleen", "kidney"),
        "bone": any_of("bone", "marrow"),
        "vessel": lab == LABELS["vessel"],
        "liver": lab == LABELS["liver"],
        "spleen": lab == LABELS["spleen"],
        "kidney": lab == LABELS["kidney"],
        "bowel": any_of("bowel", "gas"),
        "lung": lab == LABELS["lung"],
    }
    lesion_mask = np.zeros_like(masks["air"])
    if lesions:
        yy, xx = np.indices(lab.shape)
        for les in lesions:
            # the soft edge reaches half a pixel beyond the radius
            lesion_mask |= np.hypot(yy - les.row, xx - les.col) < les.radius_px + 0.5
    masks["lesion"] = lesion_mask
    return masks
