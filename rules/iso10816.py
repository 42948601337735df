"""`iso10816`: vibration severity zones A/B/C/D of a velocity RMS (mm/s, 10-1000 Hz).

    {name: motor1_iso, type: iso10816, input: motor1_de.velocity_rms, group: 2, foundation: rigid}
    {name: fan_iso, type: iso10816, input: fan.velocity_rms, class: II}
    {name: pump_iso, type: iso10816, input: pump.velocity_rms, zones: [1.8, 4.5, 7.1]}

Zone C (restricted operation) raises a warning, zone D (damage) a critical alarm; the payload
names the zone. A value exactly on a boundary belongs to the upper zone. To leave a zone the
value must fall `hysteresis` (a fraction, default 5 %) below its lower boundary, so a machine
running right at a boundary does not flap.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from rules.base import AlarmRuleConfig, RuleType, Severity, Verdict, fmt
from rules.alarm import alarm_factory

# ISO 10816-3 / 20816-3: boundaries A/B, B/C, C/D in mm/s RMS by machine group and foundation.
ISO_10816_3: dict[tuple[int, str], tuple[float, float, float]] = {
    (1, "rigid"): (2.3, 4.5, 7.1),
    (1, "flexible"): (3.5, 7.1, 11.0),
    (2, "rigid"): (1.4, 2.8, 4.5),
    (2, "flexible"): (2.3, 4.5, 7.1),
}

# ISO 10816-1 (general guidance) by machine class.
ISO_10816_1: dict[str, tuple[float, float, float]] = {
    "I": (0.71, 1.8, 4.5),
    "II": (1.12, 2.8, 7.1),
    "III": (1.8, 4.5, 11.2),
    "IV": (2.8, 7.1, 18.0),
}

_ROMAN = {1: "I", 2: "II", 3: "III", 4: "IV"}


def _machine_class(value: object) -> object:
    # YAML users write `class: 2` as often as `class: II`.
    if isinstance(value, int) and not isinstance(value, bool):
        return _ROMAN.get(value, value)
    return value.upper() if isinstance(value, str) else value


class Iso10816Config(AlarmRuleConfig):
    type: Literal["iso10816"]
    group: Literal[1, 2] | None = None
    foundation: Literal["rigid", "flexible"] | None = None
    machine_class: Annotated[Literal["I", "II", "III", "IV"] | None,
                             BeforeValidator(_machine_class)] = Field(None, alias="class")
    zones: tuple[float, float, float] | None = None  # explicit A/B, B/C, C/D boundaries
    hysteresis: float = Field(0.05, ge=0.0, lt=0.5)

    @model_validator(mode="after")
    def _one_table(self) -> "Iso10816Config":
        chosen = [self.group is not None or self.foundation is not None,
                  self.machine_class is not None, self.zones is not None]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of 'group' with 'foundation' (ISO 10816-3), "
                             "'class' (ISO 10816-1) or 'zones: [ab, bc, cd]'")
        if chosen[0] and (self.group is None or self.foundation is None):
            raise ValueError("ISO 10816-3 needs both 'group' (1 or 2) and 'foundation' (rigid or flexible)")
        if self.zones is not None:
            ab, bc, cd = self.zones
            if not 0 < ab < bc < cd:
                raise ValueError("zones must be three increasing positive boundaries [ab, bc, cd]")
        return self

    def boundaries(self) -> tuple[float, float, float]:
        if self.zones is not None:
            return self.zones
        if self.machine_class is not None:
            return ISO_10816_1[self.machine_class]
        return ISO_10816_3[(self.group, self.foundation)]  # type: ignore[index]

    def standard(self) -> str:
        if self.zones is not None:
            return "explicit zones"
        if self.machine_class is not None:
            return f"ISO 10816-1 class {self.machine_class}"
        return f"ISO 10816-3 group {self.group} {self.foundation}"


def zone_of(value: float, boundaries: tuple[float, float, float]) -> str:
    ab, bc, cd = boundaries
    return "A" if value < ab else "B" if value < bc else "C" if value < cd else "D"


class Iso10816Rule:
    def __init__(self, config: Iso10816Config) -> None:
        self.config = config
        self.default_severity: Severity = "warning"
        self.bounds = config.boundaries()
        self.extra_static = {
            "standard": config.standard(),
            "boundaries": dict(zip(("ab", "bc", "cd"), self.bounds)),
        }

    def unit_of(self, sample_unit: str | None) -> str | None:
        return "mm/s"  # the zone tables are in mm/s whatever the feature's unit label says

    def evaluate(self, value: float, ts: float, active: Severity | None) -> Verdict:
        _, bc, cd = self.bounds
        keep = 1.0 - self.config.hysteresis
        zone = zone_of(value, self.bounds)
        if zone == "D" or (active == "critical" and value >= cd * keep):
            severity: Severity | None = "critical"
            limit = cd
        elif zone == "C" or (active is not None and value >= bc * keep):
            severity, limit = "warning", bc
        else:
            severity, limit = None, (bc * keep if active is not None else bc)
        if severity is None:
            message = f"velocity {fmt(value)} mm/s in zone {zone}"
        else:
            message = f"velocity {fmt(value)} mm/s in zone {zone} ({self.extra_static['standard']})"
        return Verdict(severity, value, limit, message, {"zone": zone, **self.extra_static})


RULE = RuleType("iso10816", Iso10816Config, alarm_factory(Iso10816Rule))
