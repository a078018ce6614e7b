"""Which output profiles apply to a received series, and where each profile's output goes.

Each ``[[outputs]]`` profile may restrict the source series it applies to::

    calling_aets = ["CT_SCANNER1"]            # the sender's AE title (exact, case-insensitive)
    series_descriptions = ["*low dose*"]      # SeriesDescription glob patterns
    convolution_kernels = ["B30*", "STANDARD"]  # ConvolutionKernel glob patterns

A profile applies when every *non-empty* filter matches (any pattern of a filter may
match; an empty filter matches everything). Patterns are shell-style globs (``*``,
``?``, ``[...]``) compared case-insensitively with surrounding spaces ignored. A series
no profile applies to is stored and ignored (no job), with a log line naming its UID
and sender, never its description. ``destinations = [...]`` names the
``[[destinations]]`` a profile's derived series is sent to; empty means all of them.

The ConvolutionKernel of an Enhanced CT instance is read from its CT Reconstruction
functional group (shared, else the first frame's).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from pydicom.dataset import Dataset

from ldct_node.config import OutputProfile, Settings
from ldct_node.dicom.values import strings


def _norm(text: str) -> str:
    return text.strip().upper()


def _glob_any(patterns: Sequence[str], values: Sequence[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(_norm(value), _norm(pattern))
        for pattern in patterns
        for value in values
    )


#: The header elements :func:`matching_profiles` reads.
ROUTING_KEYWORDS = (
    "SeriesDescription",
    "ConvolutionKernel",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
)


def convolution_kernels(ds: Dataset) -> list[str]:
    """The ConvolutionKernel value(s) of an instance (classic or Enhanced CT); may be empty."""
    direct = strings(ds.get("ConvolutionKernel"))
    if direct:
        return direct
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(groups_keyword)
        if not groups:
            continue
        recon = groups[0].get("CTReconstructionSequence")
        if recon:
            kernels = strings(recon[0].get("ConvolutionKernel"))
            if kernels:
                return kernels
    return []


def profile_applies(
    profile: OutputProfile,
    *,
    calling_aet: str,
    series_description: str,
    kernels: Sequence[str],
) -> bool:
    """True when every non-empty filter of ``profile`` matches the series."""
    if profile.calling_aets and _norm(calling_aet) not in {_norm(a) for a in profile.calling_aets}:
        return False
    if profile.series_descriptions and not _glob_any(
        profile.series_descriptions, [series_description]
    ):
        return False
    return not (profile.convolution_kernels and not _glob_any(profile.convolution_kernels, kernels))


def matching_profiles(
    ds: Dataset, calling_aet: str, profiles: Sequence[OutputProfile]
) -> list[OutputProfile]:
    """The profiles that apply to the series of ``ds`` (a header is enough), in config order."""
    description = str(ds.get("SeriesDescription", "") or "")
    kernels = convolution_kernels(ds)
    return [
        p
        for p in profiles
        if profile_applies(
            p, calling_aet=calling_aet, series_description=description, kernels=kernels
        )
    ]


def destinations_for(profile: OutputProfile, settings: Settings) -> list[str]:
    """Names of the destinations ``profile``'s derived series goes to (empty list: all)."""
    if profile.destinations:
        return list(profile.destinations)
    return [d.name for d in settings.destinations]
