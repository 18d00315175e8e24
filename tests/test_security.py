"""Security, end to end on loopback: a gateway serving TLS and requiring bearer tokens, workers requiring
the gateway's client certificate (mutual TLS) and signing their cache entries, all over a Redis that
speaks only TLS and wants a password. Certificates are made here with ``cryptography``; the services
are real processes, the channels real gRPC, Redis a real redis-server."""

import asyncio
import datetime
import io
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import types
import uuid

import grpc
import numpy as np
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image

from gateway.client import Client, build_request
from gemma3serve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from serving.embedding_cache import CacheUnavailable, EmbeddingCache, decode, embedding_key, encode
from serving.security import redact_url
from tests import services

UNAUTHENTICATED, UNAVAILABLE = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE
GATEWAY, LM, VISION = "gemma3serve.v1.Gateway", "gemma3serve.v1.LMWorker", "gemma3serve.v1.VisionWorker"


# --- certificates ----------------------------------------------------------------------------------------

class Authority:
    """A CA that issues EC P-256 certificates into ``directory``."""

    def __init__(self, name: str, directory):
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = self._builder(self.name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False), critical=True).sign(self.key, hashes.SHA256())
        self.path = self._write(name, self.cert)

    def _builder(self, subject, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))

    def _write(self, name, cert, key=None):
        path = str(self.directory / f"{name}.pem")
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        if key is not None:
            with open(path[:-4] + ".key", "wb") as f:
                f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        return path

    def issue(self, name: str, server: bool) -> tuple[str, str]:
        """(certificate path, key path): a server certificate for localhost and 127.0.0.1, or a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if server else [
            ExtendedKeyUsageOID.CLIENT_AUTH]
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                        critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        path = self._write(name, builder.sign(self.key, hashes.SHA256()), key)
        return path, path[:-4] + ".key"


def read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority("ca", d), Authority("rogue-ca", d)
    pki = types.SimpleNamespace(ca=ca.path, rogue_ca=rogue.path)
    pki.server_cert, pki.server_key = ca.issue("server", server=True)
    pki.gateway_cert, pki.gateway_key = ca.issue("gateway-client", server=False)
    pki.rogue_cert, pki.rogue_key = rogue.issue("rogue-client", server=False)  # right name, wrong CA
    return pki


def client_tls(pki, cert=None, key=None, ca=None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(read(ca or pki.ca), read(key) if key else None, read(cert) if cert else None)


# --- a Redis that speaks only TLS and wants a password -----------------------------------------------------

@pytest.fixture(scope="module")
def tls_redis(pki, tmp_path_factory):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH for a private TLS Redis")
    password = secrets.token_hex(16)
    port = services.free_port()
    proc = subprocess.Popen([binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", pki.server_cert, "--tls-key-file", pki.server_key,
                             "--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "no", "--requirepass", password,
                             "--save", "", "--appendonly", "no", "--dir", str(tmp_path_factory.mktemp("redis"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"rediss://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url, ssl_ca_certs=pki.ca, socket_timeout=1)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, f"redis-server exited (built without TLS?):\n{proc.stdout.read()}"
            try:
                client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "the TLS redis-server did not answer"
                time.sleep(0.1)
        yield types.SimpleNamespace(url=url, password=password, port=port, client=client)
    finally:
        client.close()
        proc.terminate()
        proc.wait(10)


# --- the secured stack ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(served_checkpoint, pki, tls_redis, tmp_path_factory):
    d = tmp_path_factory.mktemp("secured")
    tokens = [f"tok-{secrets.token_hex(16)}", f"tok-{secrets.token_hex(16)}"]
    (d / "tokens").write_text("# who may call the gateway\n" + "\n".join(tokens) + "\n\n")
    secret = secrets.token_hex(32)
    (d / "cache-secret").write_text(secret + "\n")
    env = {"REDIS_URL": tls_redis.url, "REDIS_CA_CERT": pki.ca}  # the password stays out of argv
    workers = ["--model", served_checkpoint, "--dtype", "float32", "--cache-secret-file", str(d / "cache-secret"),
               "--tls-cert", pki.server_cert, "--tls-key", pki.server_key, "--tls-client-ca", pki.ca,
               "--log-format", "json"]
    mtls = client_tls(pki, pki.gateway_cert, pki.gateway_key)
    with services.running("lm_worker", LM, *workers, "--num-slots", "2", "--max-length", "256", credentials=mtls,
                          env=env, log=str(d / "lm.log")) as (_, lm), \
            services.running("vision_worker", VISION, *workers, credentials=mtls, env=env,
                             log=str(d / "vision.log")) as (_, vision), \
            services.running("gateway", GATEWAY, "--lm-target", lm, "--vision-target", vision,
                             "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                             "--token-file", str(d / "tokens"), "--worker-ca-cert", pki.ca,
                             "--worker-client-cert", pki.gateway_cert, "--worker-client-key", pki.gateway_key,
                             "--log-format", "json", credentials=client_tls(pki),
                             log=str(d / "gateway.log")) as (_, gateway):
        yield types.SimpleNamespace(gateway=gateway, lm=lm, vision=vision, tokens=tokens, secret=secret.encode(),
                                    dir=d, tokens_file=str(d / "tokens"))


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def ask(secured, pki, request, token="first"):
    token = secured.tokens[0] if token == "first" else token
    with Client(secured.gateway, 60, token=token, ca_cert=pki.ca) as client:
        return client.complete(request)


def refused(secured, pki, request, token, metadata=None) -> tuple[grpc.StatusCode, str]:
    """The status of a call with ``token`` (or raw ``metadata``), through the streaming and the unary method."""
    out = set()
    with grpc.secure_channel(secured.gateway, client_tls(pki)) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        metadata = metadata if metadata is not None else ((("authorization", f"Bearer {token}"),) if token else None)
        for call in (lambda: list(stub.Generate(request, timeout=30, metadata=metadata)),
                     lambda: stub.GenerateComplete(request, timeout=30, metadata=metadata)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            out.add((e.value.code(), e.value.details()))
    assert len(out) == 1, out  # both kinds of handler refuse alike
    return out.pop()


def text_request(prompt="What colour is the circle?", n=3):
    return build_request(prompt, max_new_tokens=n)


# --- bearer tokens ----------------------------------------------------------------------------------------

def test_no_token_is_unauthenticated_with_a_message_saying_what_to_send(secured, pki):
    code, details = refused(secured, pki, text_request(), token=None)
    assert code == UNAUTHENTICATED and "authorization: Bearer <token>" in details


def test_a_wrong_or_malformed_token_is_unauthenticated(secured, pki):
    code, details = refused(secured, pki, text_request(), token="tok-" + "0" * 32)
    assert code == UNAUTHENTICATED and details == "the bearer token is not valid"
    code, details = refused(secured, pki, text_request(), token=secured.tokens[0][:-1])  # a prefix is not it
    assert code == UNAUTHENTICATED and details == "the bearer token is not valid"
    code, details = refused(secured, pki, text_request(), None, metadata=(("authorization", secured.tokens[0]),))
    assert code == UNAUTHENTICATED and "must read 'Bearer <token>'" in details


def test_every_token_of_the_file_is_accepted(secured, pki):
    answers = [ask(secured, pki, text_request(), token=t) for t in secured.tokens]
    assert answers[0].token_ids and answers[0].token_ids == answers[1].token_ids
    assert answers[0].finish_reason


def test_the_cli_takes_the_token_from_the_environment_and_the_ca_from_a_flag(secured, pki):
    def cli(token):
        env = {**os.environ, "PYTHONPATH": services.ROOT, "GEMMA3_CLIENT_TOKEN": token}
        return subprocess.run([sys.executable, "-m", "gateway.client", "--target", secured.gateway, "--ca-cert",
                               pki.ca, "--max-new-tokens", "3", "Hello"], env=env, capture_output=True, text=True,
                              timeout=120)

    good, bad = cli(secured.tokens[1]), cli("nope")
    assert good.returncode == 0, good.stderr
    assert bad.returncode == 1 and "UNAUTHENTICATED: the bearer token is not valid" in bad.stderr


def test_health_and_reflection_need_no_token(secured, pki):
    with grpc.secure_channel(secured.gateway, client_tls(pki)) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=GATEWAY), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert GATEWAY in names


# --- TLS on the gateway -----------------------------------------------------------------------------------

def test_only_a_client_trusting_the_gateways_ca_gets_through(secured, pki):
    def health(channel):
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=GATEWAY), timeout=5)

    with grpc.secure_channel(secured.gateway, client_tls(pki)) as channel:
        assert health(channel).status == health_pb2.HealthCheckResponse.SERVING
    for channel in (grpc.insecure_channel(secured.gateway),  # plaintext against TLS
                    grpc.secure_channel(secured.gateway, client_tls(pki, ca=pki.rogue_ca))):  # another CA
        with channel, pytest.raises(grpc.RpcError) as e:
            health(channel)
        assert e.value.code() == UNAVAILABLE
    with Client(secured.gateway, 10, token=secured.tokens[0]) as plaintext, pytest.raises(grpc.RpcError) as e:
        plaintext.complete(text_request())
    assert e.value.code() == UNAVAILABLE


# --- mutual TLS between the gateway and the workers -------------------------------------------------------

@pytest.mark.parametrize("worker", ["lm", "vision"])
def test_a_worker_accepts_only_client_certificates_its_ca_signed(secured, pki, worker):
    target, service = (secured.lm, LM) if worker == "lm" else (secured.vision, VISION)

    def health(credentials):
        channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        with channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                             timeout=5).status

    assert health(client_tls(pki, pki.gateway_cert, pki.gateway_key)) == health_pb2.HealthCheckResponse.SERVING
    for credentials in (client_tls(pki, pki.rogue_cert, pki.rogue_key), client_tls(pki), None):
        with pytest.raises(grpc.RpcError) as e:
            health(credentials)
        assert e.value.code() == UNAVAILABLE


def test_a_gateway_with_a_certificate_from_another_ca_cannot_reach_the_workers(secured, pki):
    with services.running("gateway", GATEWAY, "--lm-target", secured.lm, "--vision-target", secured.vision,
                          "--token-file", secured.tokens_file, "--worker-ca-cert", pki.ca,
                          "--worker-client-cert", pki.rogue_cert, "--worker-client-key", pki.rogue_key) as (_, rogue):
        with Client(rogue, 30, token=secured.tokens[0]) as client, pytest.raises(grpc.RpcError) as e:
            client.complete(text_request())
    assert e.value.code() == UNAVAILABLE and "the LM worker is unavailable" in e.value.details()
    assert ask(secured, pki, text_request()).token_ids  # the gateway with the right certificate still answers


# --- workers refuse plaintext off loopback ----------------------------------------------------------------

@pytest.mark.parametrize("module,prefix", [("lm_worker", "GEMMA3_LM"), ("vision_worker", "GEMMA3_VISION")])
def test_a_worker_on_every_interface_without_tls_refuses_to_start(served_checkpoint, module, prefix):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_ALLOW_INSECURE")}
    env.update(PYTHONPATH=services.ROOT)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", module, "--model", served_checkpoint, "--host", "0.0.0.0",
                          "--port", str(services.free_port())], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "refusing to serve plaintext gRPC on 0.0.0.0" in out.stderr
    assert "--allow-insecure" in out.stderr and f"{prefix}_ALLOW_INSECURE=1" in out.stderr
    assert time.monotonic() - started < 60  # before loading anything


@pytest.mark.parametrize("module,prefix", [("lm_worker", "GEMMA3_LM"), ("vision_worker", "GEMMA3_VISION")])
def test_what_lets_a_worker_listen_beyond_loopback(served_checkpoint, pki, module, prefix, monkeypatch, capsys):
    import importlib

    parse_args = importlib.import_module(f"{module}.__main__").parse_args
    monkeypatch.delenv(f"{prefix}_ALLOW_INSECURE", raising=False)
    base = ["--model", served_checkpoint]
    for host in ("0.0.0.0", "::", "10.1.2.3", "gemma.internal"):
        with pytest.raises(SystemExit):
            parse_args([*base, "--host", host])
    assert "refusing to serve plaintext" in capsys.readouterr().err
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert parse_args([*base, "--host", host]).server_credentials is None
    assert parse_args([*base, "--host", "0.0.0.0", "--allow-insecure"]).allow_insecure
    tls = parse_args([*base, "--host", "0.0.0.0", "--tls-cert", pki.server_cert, "--tls-key", pki.server_key])
    assert tls.server_credentials is not None
    monkeypatch.setenv(f"{prefix}_ALLOW_INSECURE", "1")
    assert parse_args([*base, "--host", "0.0.0.0"]).allow_insecure
    for bad in (["--tls-cert", pki.server_cert], ["--tls-client-ca", pki.ca], ["--tls-cert", "/nonexistent.pem",
                                                                               "--tls-key", pki.server_key]):
        with pytest.raises(SystemExit):
            parse_args([*base, *bad])
    err = capsys.readouterr().err
    assert "go together" in err and "needs --tls-cert" in err and "cannot read the TLS certificate" in err


# --- signed cache entries ---------------------------------------------------------------------------------

def redis_client(tls_redis, pki):
    return redis.Redis.from_url(tls_redis.url, ssl_ca_certs=pki.ca)


def test_a_forged_cache_entry_is_embedded_again_never_used(secured, pki, tls_redis):
    image = png(int(np.random.default_rng().integers(1 << 30)))
    request = build_request("What is in this image?", [image], max_new_tokens=4)
    first = ask(secured, pki, request)
    (key,) = first.usage.image_embedding_keys
    assert first.usage.image_cache_hits == 0
    r = redis_client(tls_redis, pki)
    honest = decode(services.landed(lambda: r.get(key)), key=key, secret=secured.secret)
    assert honest is not None, "the vision worker signs what it stores"
    assert ask(secured, pki, request).usage.image_cache_hits == 1  # the signed entry is used

    forged = np.full_like(honest, 4.0)
    elsewhere = f"{key}-elsewhere"
    for value in (encode(forged),  # a valid SHA-256, no HMAC
                  encode(forged, key, b"not the workers' secret, guessed"),  # an HMAC under another secret
                  encode(forged, elsewhere, secured.secret)):  # signed for another key, moved here
        assert decode(value) is not None  # each passes the checksum alone
        r.set(key, value)
        reply = ask(secured, pki, request)
        assert reply.usage.image_cache_hits == 0, "the forged entry counted as a hit"
        assert list(reply.token_ids) == list(first.token_ids)
        again = decode(services.landed(lambda: r.get(key), lambda v: decode(v, key=key, secret=secured.secret)
                                       is not None), key=key, secret=secured.secret)
        assert np.allclose(again, honest)  # overwritten with the real embedding

    r.set(key, encode(forged, key, secured.secret))  # the control: what the secret signed is trusted
    assert ask(secured, pki, request).usage.image_cache_hits == 1
    r.delete(key)
    r.close()
    with open(secured.dir / "vision.log") as f:
        assert "unusable cache entry treated as a miss" in f.read()


def test_the_lm_worker_answers_not_found_for_an_unsigned_embedding_key(secured, pki, tls_redis, served_checkpoint):
    with open(os.path.join(served_checkpoint, "config.json")) as f:
        config = json.load(f)
    shape = (1, config["mm_tokens_per_image"], config["text_config"]["hidden_size"])
    features = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    key = f"test:{uuid.uuid4()}"
    conversation = services.chat("Where is the square?", images=1)
    conversation.turns[0].parts[0].image.embedding_key = key
    request = gateway_pb2.GenerateRequest(chat=conversation, sampling=common_pb2.SamplingParams(max_new_tokens=3))
    r = redis_client(tls_redis, pki)
    try:
        for value in (encode(features), encode(features, key, b"not the workers' secret, guessed"),
                      encode(features, key + "x", secured.secret)):
            r.set(key, value, ex=60)
            with pytest.raises(grpc.RpcError) as e:
                ask(secured, pki, request)
            assert e.value.code() == grpc.StatusCode.NOT_FOUND and "is not in the cache" in e.value.details()
        r.set(key, encode(features, key, secured.secret), ex=60)
        assert ask(secured, pki, request).token_ids
    finally:
        r.delete(key)
        r.close()


# --- Redis over TLS with a password -----------------------------------------------------------------------

def test_the_cache_reaches_redis_over_tls_with_a_password_and_only_so(tls_redis, pki):
    secret = b"a shared secret of 32 bytes....."
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    key = f"test:{uuid.uuid4()}"

    async def round_trip(url, ca):
        cache = EmbeddingCache(url, ttl_seconds=30, timeout=2, secret=secret, ssl_ca_certs=ca)
        try:
            await cache.put(key, array)
            (raw,) = await cache.get_many([key])
            return cache.decode(key, raw, (3, 4))
        finally:
            await cache.close()

    assert np.array_equal(asyncio.run(round_trip(tls_redis.url, pki.ca)), array)
    wrong_password = tls_redis.url.replace(tls_redis.password, "guess")
    plaintext = tls_redis.url.replace("rediss://", "redis://")
    for url, ca in ((tls_redis.url, None), (tls_redis.url, pki.rogue_ca), (wrong_password, pki.ca), (plaintext, None)):
        with pytest.raises(CacheUnavailable):
            asyncio.run(round_trip(url, ca))
    tls_redis.client.delete(key)


def test_no_password_or_token_reaches_the_logs(secured, pki, tls_redis):
    ask(secured, pki, text_request())
    with pytest.raises(grpc.RpcError):
        ask(secured, pki, text_request(), token="tok-wrong")
    logs = {name: (secured.dir / f"{name}.log").read_text() for name in ("lm", "vision", "gateway")}
    for name in ("lm", "vision"):
        line = next(json.loads(x) for x in logs[name].splitlines() if '"embedding cache"' in x)
        assert line["redis"] == f"rediss://:***@127.0.0.1:{tls_redis.port}/0" and line["signed"] is True
    for name, text in logs.items():
        assert tls_redis.password not in text, name
        assert not any(t in text for t in secured.tokens), name
    assert "the bearer token is not valid" in logs["gateway"]


def test_redact_url():
    assert redact_url("rediss://:s3cret@redis:6380/0") == "rediss://:***@redis:6380/0"
    assert redact_url("rediss://app:s3cret@[::1]:6380/2") == "rediss://app:***@[::1]:6380/2"
    assert redact_url("redis://app@redis:6379/0") == "redis://app@redis:6379/0"  # no password to hide
    assert redact_url("redis://redis:6379/0?password=s3cret&db=1") == "redis://redis:6379/0?password=***&db=1"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"


# --- keys per model -------------------------------------------------------------------------------------

def test_two_models_never_share_a_key(served_checkpoint, tmp_path):
    """The key carries the fingerprint of the vision tower and projector: another model's weights give
    another key for the same image even in a directory of the same name; a change of the text weights
    only (which the embedding does not depend on) keeps it."""
    from safetensors.numpy import load_file, save_file

    from gemma3 import Gemma3ImageEncoder
    from vision_worker.service import namespace_for, weights_fingerprint

    def variant(where, prefix):
        path = tmp_path / where / os.path.basename(served_checkpoint)
        shutil.copytree(served_checkpoint, path)
        (weights,) = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        tensors = load_file(path / weights)
        name = sorted(k for k in tensors if prefix in k)[0]
        tensors[name] = tensors[name] + np.ones_like(tensors[name])
        save_file(tensors, path / weights, metadata={"format": "pt"})
        return str(path)

    vision_changed, text_changed = variant("a", "vision_tower"), variant("b", "language_model")
    processing = {"size": 896, "do_pan_and_scan": False}

    def key(path):
        return embedding_key(namespace_for(path), png(1), weights_fingerprint(path, Gemma3ImageEncoder), processing)

    assert namespace_for(vision_changed) == namespace_for(served_checkpoint)  # same directory name ...
    assert key(vision_changed) != key(served_checkpoint)  # ... yet another key
    assert key(text_changed) == key(served_checkpoint) == key(served_checkpoint)


# --- the launcher and the client pass the options through -------------------------------------------------

def test_the_launcher_passes_tls_and_tokens_to_the_gateway_and_its_client(served_checkpoint, pki, tmp_path,
                                                                         monkeypatch):
    from launcher.__main__ import client_security_args, gateway_security_args, parse_args

    tokens = tmp_path / "tokens"
    tokens.write_text("first-token\nsecond-token\n")
    monkeypatch.delenv("GEMMA3_GATEWAY_TOKENS", raising=False)
    args = parse_args(["--model", served_checkpoint, "--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                       "--token-file", str(tokens), "--ca-cert", pki.ca])
    assert gateway_security_args(args) == ["--tls-cert", pki.server_cert, "--tls-key", pki.server_key,
                                           "--token-file", str(tokens)]
    assert client_security_args(args) == ["--ca-cert", pki.ca, "--token", "first-token"]
    plain = parse_args(["--model", served_checkpoint])
    assert gateway_security_args(plain) == client_security_args(plain) == []
    monkeypatch.setenv("GEMMA3_GATEWAY_TOKENS", "from-env, other")
    assert client_security_args(parse_args(["--model", served_checkpoint])) == ["--token", "from-env"]
