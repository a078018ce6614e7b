"""config.toml -> typed, validated settings.

Every key (the example is ``config.toml``) has a default except where noted. Unknown keys and
wrong types raise :class:`ConfigError` naming the offending key and the file.
Relative paths (spool, weights, SQLite database) are resolved against the
directory holding the config file, so the node behaves the same whatever the
working directory of the process is. Strict types: a TOML integer is fine for a
float key (``7`` or ``7.0``), a bool is no number.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ENV_VAR = "LDCT_NODE_CONFIG"
DEFAULT_FILE = "config.toml"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash
_UID_ROOT_RE = re.compile(r"^([0-9]+(\.[0-9]+)*\.?)?$")


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the key and the file."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not _AE_RE.match(value) or not stripped:
        raise ValueError("must be 1-16 printable characters without backslash")
    return stripped


class NodeSettings(_Section):
    ae_title: str = "LDCT_NODE"
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=0, le=65535)
    max_associations: int = Field(10, ge=1)
    # Let several `serve --role receiver` processes of this host listen on node.port
    # (SO_REUSEPORT, Linux): the kernel spreads new associations across them, so
    # concurrent senders use more than one CPU core. Every one of them must set it.
    reuse_port: bool = False

    _ae = field_validator("ae_title")(classmethod(lambda cls, v: _check_ae(v)))


class SecuritySettings(_Section):
    allowed_calling_aets: list[str] = Field(default_factory=list)
    allowed_hosts: list[str] = Field(default_factory=list)
    # The called AE title must be node.ae_title (else A-ASSOCIATE-RJ, reason 0x07).
    require_called_aet: bool = True
    # Seconds from accept for the TLS handshake and the whole A-ASSOCIATE-RQ.
    association_request_timeout: float = Field(10, gt=0, le=300)
    # Connections that have not yet sent a complete A-ASSOCIATE-RQ, at most (apart from
    # node.max_associations); when all are taken the oldest of them is closed.
    max_pending_connections: int = Field(64, ge=1, le=10_000)
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    @field_validator("allowed_hosts")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from exc
        return value

    @model_validator(mode="after")
    def _tls_pair(self) -> SecuritySettings:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_ca and not self.tls_cert:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        return self

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


class StorageSettings(_Section):
    spool_dir: str = "var/spool"
    database_url: str = "sqlite:///var/ldct-node.db"
    retention_days: float = Field(7, ge=0)
    min_free_gb: float = Field(5, ge=0)


class SeriesSettings(_Section):
    stable_seconds: float = Field(30, ge=0)
    accept_sop_classes: list[str] = Field(default_factory=lambda: [CT_IMAGE_STORAGE])
    skip_image_types: list[str] = Field(default_factory=lambda: ["LOCALIZER"])
    ignore_derived: bool = True


class ModelSettings(_Section):
    #: Empty: the bundled weights (see :func:`bundled_weights_dir`); else a folder with a
    #: MANIFEST.json, relative to the config file's folder.
    weights_dir: str = ""
    batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "gpu"] = "auto"
    precision: Literal["float32", "bfloat16", "mixed_float16"] = "float32"
    #: Process memory (MB) the worker keeps inference under: batches and tiles of large
    #: slices are sized to what is left of it (see ldct_node.model.cascade).
    memory_budget_mb: float = Field(4096, gt=0)


DEFAULT_HU_FIDELITY_MM = 2.0
"""Shipped default of ``[[outputs]] hu_fidelity_mm`` (held-out evaluation at 512x512)."""


class OutputProfile(_Section):
    name: str = "denoised"
    blend: float = Field(0.0, ge=0.0, le=1.0)
    # Sigma (mm) of the low-pass that keeps the output's CT numbers on the input's
    # (ldct_node.model.fidelity); 0 = off. 2 mm chosen by measurement (README).
    hu_fidelity_mm: float = Field(DEFAULT_HU_FIDELITY_MM, ge=0.0, le=20.0)
    series_description_suffix: str = " [LDCT denoised]"
    series_number_offset: int = 1000
    # Routing (see ldct_node.service.routing): where this profile's series go and which source
    # series it applies to. Empty lists mean "all destinations" / "no restriction".
    destinations: list[str] = Field(default_factory=list)
    calling_aets: list[str] = Field(default_factory=list)
    series_descriptions: list[str] = Field(default_factory=list)
    convolution_kernels: list[str] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        return value

    @field_validator("calling_aets")
    @classmethod
    def _aets(cls, value: list[str]) -> list[str]:
        return [_check_ae(v) for v in value]

    @field_validator("destinations", "series_descriptions", "convolution_kernels")
    @classmethod
    def _non_blank(cls, value: list[str]) -> list[str]:
        if any(not v.strip() for v in value):
            raise ValueError("entries must not be empty")
        return value


class MetricsSettings(_Section):
    """Prometheus endpoint (``/metrics``), off by default."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


_DICOMWEB_ONLY = ("url", "username", "password_file", "password_env")
_DIMSE_ONLY = ("ae_title", "host", "port", "tls", "tls_server_name", "associations")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


class Destination(_Section):
    """One ``[[destinations]]`` entry: where derived series are sent.

    ``type = "dimse"`` (the default) sends with C-STORE to ``ae_title`` at
    ``host``:``port``; ``tls = true`` makes that DICOM TLS (TLS 1.2+), verifying the
    peer's certificate against ``tls_ca`` and its name against ``tls_server_name`` (else
    ``host``), with ``tls_cert``/``tls_key`` as the client certificate for mutual TLS;
    ``associations`` (1-16, default 1) sends each series over that many at once.
    ``type = "dicomweb"`` sends with STOW-RS to ``url`` (http or https; ``tls_ca``
    replaces the system's trust store for https), optionally with HTTP basic
    authentication as ``username`` with the password read from ``password_file`` or the
    environment variable ``password_env`` at each attempt. For a DICOMweb destination
    ``host`` and ``port`` are taken from ``url`` (not TOML keys) and ``ae_title`` is empty.

    Paths are as written in the file; :meth:`with_paths_resolved` makes them absolute.
    """

    name: str
    type: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    #: Associations a series is sent over at once (each takes the next file). A PACS
    #: that stores in parallel takes more this way: Orthanc 1.52 x with 2, 1.68 x with
    #: 4; DCMTK's storescp serves one at a time (0.7 x). One the peer refuses is done
    #: without.
    associations: int = Field(default=1, ge=1, le=16)
    url: str = ""
    username: str = ""
    password_file: str = ""
    password_env: str = ""

    @model_validator(mode="before")
    @classmethod
    def _keys_of_type(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("type", "dimse")
        if kind == "dimse":
            for key in _DICOMWEB_ONLY:
                if key in data:
                    raise ValueError(f"{key!r} is only used with type = 'dicomweb'")
        elif kind == "dicomweb":
            for key in _DIMSE_ONLY:
                if key in data:
                    raise ValueError(
                        f"{key!r} is not used with type = 'dicomweb' "
                        "(url says where to send; an https url means TLS)"
                    )
            host, port = "", 443
            url = data.get("url")
            if isinstance(url, str):
                try:
                    parts = urlsplit(url)
                    host = parts.hostname or ""
                    port = parts.port or (80 if parts.scheme == "http" else 443)
                except ValueError:
                    pass  # reported by _by_type with the key's name
            return {**data, "ae_title": "", "host": host, "port": port}
        return data

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str, info: ValidationInfo) -> str:
        if info.data.get("type") == "dicomweb":
            return value
        return _check_ae(value)

    @field_validator("password_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        if value and not _ENV_NAME_RE.match(value):
            raise ValueError("must be the name of an environment variable (letters, digits, _)")
        return value

    @field_validator("tls_server_name")
    @classmethod
    def _server_name(cls, value: str) -> str:
        if value and not _HOSTNAME_RE.match(value):
            raise ValueError("must be a host name or IP address")
        return value

    @model_validator(mode="after")
    def _by_type(self) -> Destination:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key must be set together (mutual TLS)")
        if self.type == "dimse":
            if not self.tls and (self.tls_ca or self.tls_cert or self.tls_server_name):
                raise ValueError(
                    "tls_ca / tls_cert / tls_key / tls_server_name are set but tls = false: "
                    "set tls = true to send over DICOM TLS"
                )
            if self.tls and not self.tls_ca:
                raise ValueError(
                    "tls_ca is required with tls = true: the CA certificate (PEM) that "
                    "signed the destination's certificate"
                )
            return self
        self._check_url()
        if self.password_file and self.password_env:
            raise ValueError("set password_file or password_env, not both")
        if self.username and not (self.password_file or self.password_env):
            raise ValueError("username needs password_file or password_env")
        if (self.password_file or self.password_env) and not self.username:
            raise ValueError("password_file / password_env need username")
        if ":" in self.username:
            raise ValueError("username must not contain ':' (HTTP basic authentication)")
        return self

    def _check_url(self) -> None:
        if not self.url:
            raise ValueError("url is required with type = 'dicomweb' (the STOW-RS base URL)")
        try:
            parts = urlsplit(self.url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            raise ValueError(f"url: {exc}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://host/... or https://host/... (got {self.url!r})")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "url must not hold credentials: use username with password_file or password_env"
            )
        if parts.query or parts.fragment:
            raise ValueError("url must be the DICOMweb base URL, without ?query or #fragment")
        if parts.scheme == "http" and (self.tls_ca or self.tls_cert):
            raise ValueError("tls_ca / tls_cert / tls_key need an https url")

    @property
    def uses_tls(self) -> bool:
        """Whether this destination is reached over TLS (DICOM TLS or https)."""
        return self.tls if self.type == "dimse" else self.url.startswith("https:")

    def with_paths_resolved(self, base_dir: str | os.PathLike[str]) -> Destination:
        """A copy whose file paths (``tls_*``, ``password_file``) are absolute, relative
        ones taken against ``base_dir`` (the config file's folder)."""

        def resolve(path: str) -> str:
            if not path:
                return path
            p = Path(path).expanduser()
            return str(p if p.is_absolute() else (Path(base_dir) / p).resolve())

        keys = ("tls_ca", "tls_cert", "tls_key", "password_file")
        return self.model_copy(update={k: resolve(getattr(self, k)) for k in keys})


class ForwardSettings(_Section):
    max_attempts: int = Field(10, ge=1)
    backoff_seconds: list[float] = Field(default_factory=lambda: [10.0, 30.0, 60.0, 300.0, 900.0])

    @field_validator("backoff_seconds")
    @classmethod
    def _non_empty(cls, value: list[float]) -> list[float]:
        if not value or any(v < 0 for v in value):
            raise ValueError("must be a non-empty list of seconds >= 0")
        return value

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        index = min(max(attempt, 1), len(self.backoff_seconds)) - 1
        return self.backoff_seconds[index]


class WorkerSettings(_Section):
    """How a worker holds its job when several processes share one database."""

    # A running job (or a forward being sent) belongs to its process this long after
    # its last heartbeat; then any other process may take it over (the owner died).
    lease_seconds: float = Field(300, ge=1)


class DicomSettings(_Section):
    uid_root: str = ""
    image_comments: str = "Denoised by ldct-node; not for primary diagnosis without validation"

    @field_validator("uid_root")
    @classmethod
    def _root(cls, value: str) -> str:
        if not _UID_ROOT_RE.match(value) or len(value) > 40:
            raise ValueError("must be a dotted numeric UID root of at most 40 characters")
        if value and not value.endswith("."):
            value += "."
        return value


class Settings(_Section):
    node: NodeSettings = Field(default_factory=NodeSettings)
    security: SecuritySettings = Field(default_factory=SecuritySettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    outputs: list[OutputProfile] = Field(default_factory=lambda: [OutputProfile()])
    destinations: list[Destination] = Field(default_factory=list)
    forward: ForwardSettings = Field(default_factory=ForwardSettings)
    dicom: DicomSettings = Field(default_factory=DicomSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)

    # Where the file lives; relative paths resolve against it. Not a TOML key.
    base_dir: str = Field(default=".", exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        for kind, names in (
            ("outputs", [o.name for o in self.outputs]),
            ("destinations", [d.name for d in self.destinations]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind}: duplicate name(s) {', '.join(dupes)}")
        if not self.outputs:
            raise ValueError("outputs: at least one [[outputs]] profile is needed")
        known = {d.name for d in self.destinations}
        for profile in self.outputs:
            unknown = [n for n in profile.destinations if n not in known]
            if unknown:
                raise ValueError(
                    f"outputs: profile {profile.name!r} names destination(s) "
                    f"{', '.join(unknown)} that no [[destinations]] entry has"
                )
        return self

    # -- resolved paths -------------------------------------------------------------
    def resolve(self, path: str) -> Path:
        """A path from the config, made absolute against the config file's directory."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else (Path(self.base_dir) / p).resolve()

    @property
    def spool_path(self) -> Path:
        return self.resolve(self.storage.spool_dir)

    @property
    def weights_path(self) -> Path:
        """``model.weights_dir`` resolved; unset: the bundled weights."""
        if not self.model.weights_dir:
            return bundled_weights_dir()
        return self.resolve(self.model.weights_dir)

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, with a relative SQLite path made absolute."""
        url = self.storage.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith("sqlite:////"):
            rest = url[len(prefix) :]
            if rest and rest != ":memory:":
                return prefix + str(self.resolve(rest))
        return url

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        known = ", ".join(d.name for d in self.destinations) or "none configured"
        raise KeyError(f"no destination named {name!r} (known: {known})")


def bundled_weights_candidates() -> list[Path]:
    """Where the bundled weights may be: the installed copy (``<prefix>/share``), then
    the source tree the package runs from."""
    return [
        Path(sys.prefix) / "share" / "ldct-node" / "weights",
        Path(__file__).resolve().parents[1] / "weights",
    ]


def bundled_weights_dir() -> Path:
    """The first bundled weights folder with a MANIFEST.json (else the source tree's
    path, which then fails to load with a message naming it)."""
    candidates = bundled_weights_candidates()
    for path in candidates:
        if (path / "MANIFEST.json").is_file():
            return path
    return candidates[-1]


def default_config_path() -> Path:
    """``$LDCT_NODE_CONFIG``, else ``./config.toml`` (README, "Commands")."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(DEFAULT_FILE)


def _format_loc(loc: tuple[Any, ...]) -> str:
    """('outputs', 0, 'blend') -> 'outputs[0].blend'."""
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text


def parse_settings(data: dict[str, Any], source: str = "<config>", base_dir: str = ".") -> Settings:
    """Validate a parsed TOML mapping.

    Raises
    ------
    ConfigError
        Naming the first offending key (dotted, e.g. ``node.port``) and ``source``.
    """
    if "base_dir" in data:
        raise ConfigError(f"{source}: unknown key 'base_dir'")
    try:
        return Settings.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        err = exc.errors()[0]
        key = _format_loc(tuple(err["loc"])) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown key '{key}'") from None
        if err["type"] == "missing":
            raise ConfigError(f"{source}: missing required key '{key}'") from None
        msg = str(err["msg"]).removeprefix("Value error, ")
        got = err.get("input")
        shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
        raise ConfigError(f"{source}: invalid value for '{key}': {msg}{shown}") from None


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Read and validate a config file (``None``: the default location).

    A missing default file gives the built-in defaults; a missing explicit file is an error.
    """
    explicit = path is not None or ENV_VAR in os.environ
    cfg_path = Path(path) if path is not None else default_config_path()
    if not cfg_path.exists():
        if explicit:
            raise ConfigError(f"{cfg_path}: config file not found")
        return parse_settings({}, source="<defaults>", base_dir=str(Path.cwd()))
    try:
        data = tomllib.loads(cfg_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg_path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{cfg_path}: cannot read: {exc.strerror}") from None
    return parse_settings(data, source=str(cfg_path), base_dir=str(cfg_path.resolve().parent))
