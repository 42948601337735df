"""One place that turns a BrokerConfig into a configured paho-mqtt 2.x client."""

from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt

from gateway.schema import BrokerConfig


def make_client(cfg: BrokerConfig, client_id: str, *, clean: bool = True) -> mqtt.Client:
    protocol = mqtt.MQTTv5 if cfg.protocol == "5" else mqtt.MQTTv311
    kwargs = {} if protocol == mqtt.MQTTv5 else {"clean_session": clean}
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        **kwargs,
    )
    if cfg.username is not None:
        client.username_pw_set(cfg.username, cfg.resolved_password())
    if cfg.tls.enabled:
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file) if cfg.tls.ca_file else None)
        if cfg.tls.cert_file:
            ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file) if cfg.tls.key_file else None)
        if cfg.tls.insecure_skip_verify:
            ctx.check_hostname = False
        client.tls_set_context(ctx)
    client.reconnect_delay_set(min_delay=max(1, int(cfg.reconnect_min)), max_delay=max(1, int(cfg.reconnect_max)))
    return client


def connect_kwargs(cfg: BrokerConfig) -> dict:
    kwargs = {"host": cfg.host, "port": cfg.port, "keepalive": max(1, int(cfg.keepalive))}
    if cfg.protocol == "5":
        kwargs["clean_start"] = True
    return kwargs
