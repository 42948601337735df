"""Building blocks of the typed configuration, shared by the core, drivers, rules and analytics.

Kept apart from `gateway.config` (which assembles the root model from the registries) so that
driver and rule modules can import them without an import cycle.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """`500ms`, `10s`, `5m`, `1h`, `1d` or a bare number of seconds -> seconds (float)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 10s, 5m or 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    else:
        raise ValueError(f"invalid duration {value!r}: expected e.g. 500ms, 10s, 5m, 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """`1GiB`, `500MB`, `64k` or a bare number of bytes -> bytes (int). KiB=1024, KB=1000."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 100MiB or 1GiB")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        number, unit = float(m.group(1)), (m.group(2) or "B").upper()
        if unit == "B":
            return int(number)
        base = 1024 if "I" in unit else 1000
        power = "KMGT".index(unit[0]) + 1
        return int(number * base**power)
    raise ValueError(f"invalid size {value!r}: expected e.g. 64MiB, 1GiB, 500MB")


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", min_length=1, max_length=64)]


class StrictModel(BaseModel):
    """Every config model: unknown keys are errors, values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def read_secret(path: str | Path | None) -> str | None:
    """Read a `*_file` secret; a trailing newline is not part of the secret."""
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None


def _readable_secret(path: Path) -> Path:
    read_secret(path)  # fails at load time, with the line of the *_file key, not at connect time
    return path


SecretFile = Annotated[Path, AfterValidator(_readable_secret)]


def tagged_union(models: list[type[BaseModel]], tag: str) -> Any:
    """A pydantic discriminated union over registered models, keyed by the Literal field `tag`.

    Registries (drivers, rules) add a model; nothing here needs an if-chain.
    """
    if not models:
        def _none(value: Any) -> Any:
            raise ValueError(f"no {tag} types are installed")

        return Annotated[dict, AfterValidator(_none)]
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator=tag)]  # noqa: UP007


class TlsConfig(StrictModel):
    """TLS towards a broker. Any of these set means TLS; there is no fallback to plaintext."""

    ca_file: Path | None = Field(None, description="CA bundle that signed the broker certificate (PEM)")
    cert_file: Path | None = Field(None, description="client certificate (PEM), for brokers that require one")
    key_file: Path | None = Field(None, description="private key of cert_file (PEM)")
    insecure_skip_verify: bool = Field(False, description="lab only: check the chain but not the host name")

    @property
    def enabled(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))


class BrokerConfig(StrictModel):
    """How to reach an MQTT broker: used by `upstream:` and by the `mqtt` driver."""

    host: str = Field("127.0.0.1", description="broker host name or address")
    port: int = Field(1883, ge=1, le=65535, description="8883 is usual with TLS")
    protocol: Annotated[str, BeforeValidator(lambda v: str(v))] = Field("5", pattern=r"^(5|3\.1\.1)$", description="MQTT version: 5 or 3.1.1")
    client_id: str | None = Field(None, description="default: the gateway id (upstream) or gateway id + device name")
    username: str | None = None
    password: str | None = Field(None, repr=False, description="prefer password_file or an environment variable")
    password_file: SecretFile | None = Field(None, description="file holding the password (trailing newline ignored); must be readable")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="any file set here turns TLS on; never falls back to plaintext")
    keepalive: Duration = 30.0
    reconnect_min: Duration = Field(0.5, description="first reconnect delay; doubles, with jitter, per failure")
    reconnect_max: Duration = Field(10.0, description="reconnect back-off grows to this at most")

    @model_validator(mode="after")
    def _one_password(self) -> "BrokerConfig":
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        return self

    def resolved_password(self) -> str | None:
        return self.password if self.password is not None else read_secret(self.password_file)


class Reported(StrictModel):
    """Report by exception (Sparkplug upstreams): when a scalar tag's value goes upstream."""

    deadband: float = Field(0.0, ge=0, description="sparkplug: a number is sent when it moves more than this from the "
                                                  "value last sent (absolute, engineering units); 0: any change")
    max_silence: Duration | None = Field(None, gt=0, description="sparkplug: send the value at least this often, "
                                                                 "changed or not")


WriteValue = bool | int | float | str


class WritePermission(StrictModel):
    """What a tag allows to be written (drivers' tag models inherit it). Off unless `writable`."""

    writable: bool = Field(False, description="the gateway may write this tag (also needs commands.write: true)")
    min: float | None = Field(None, description="writable: lowest value accepted, in engineering units (after scale/offset)")
    max: float | None = Field(None, description="writable: highest value accepted, in engineering units")
    allowed: list[WriteValue] | None = Field(None, min_length=1, description="writable: the only values accepted")
    verify: bool = Field(True, description="writable: read the value back after a write and reply with it")

    @model_validator(mode="after")
    def _write_limits(self) -> "WritePermission":
        if not self.writable:
            given = [k for k in ("min", "max", "allowed") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)} apply to writable tags only (add writable: true)")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min:g} is above max {self.max:g}")
        return self
