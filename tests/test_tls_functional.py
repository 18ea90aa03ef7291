"""HTTPS on the balancer's own port, with a self-signed certificate made here (the `openssl` command): the
OpenAI SDK over both legs (the lean relay's chat completions, aiohttp's model list), keys and all; the
certificate read again on reload; and `serve` itself (uvloop) answering HTTPS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest

from llmbalancer.reloading import ConfigSource
from llmbalancer.testing.fake_llama import run_fake_llama
from tests.keys_support import CHAT, TEAM_A
from tests.support import balancer_process, free_port, run_balancer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")


def make_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key (PEM files)."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


async def _served_certificate(port: int) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert isinstance(certificate, bytes)
        return certificate
    finally:
        writer.close()
        await writer.wait_closed()


def _pem_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


@pytest.mark.parametrize("relay", ["lean", "aiohttp"])
async def test_https_with_a_self_signed_certificate_serves_the_sdk_with_keys(tmp_path: Path, relay: str) -> None:
    cert, key = make_certificate(tmp_path)
    async with run_fake_llama() as fake:
        config_file = tmp_path / "config.yaml"
        config_file.write_text(
            f"backends: ['{fake.url}']\nserver: {{tls_cert: {cert}, tls_key: {key}, relay: {relay}}}\n"
            f"auth: {{keys: [{{name: team-a, key: {TEAM_A}}}]}}\nhealth: {{interval: 0.2}}\n"
        )
        source = ConfigSource(config_file=str(config_file), environ={})
        async with run_balancer(source.load(), source) as balancer:
            assert balancer.url.startswith("https://")
            trusted = httpx.AsyncClient(verify=ssl.create_default_context(cafile=str(cert)))
            async with openai.AsyncOpenAI(
                base_url=balancer.url + "/v1", api_key=TEAM_A, max_retries=0, http_client=trusted
            ) as sdk:
                reply = await sdk.chat.completions.create(**CHAT)
                assert reply.choices[0].message.content
                stream = await sdk.chat.completions.create(**CHAT, stream=True)
                assert [c async for c in stream]
                assert [m.id async for m in sdk.models.list()] == ["smollm2"]
            seen = fake.stats["last_by_path"]["/v1/chat/completions"]["headers"]
            assert seen["x-forwarded-proto"] == "https"
            assert "authorization" not in seen
            async with aiohttp.ClientSession() as session:  # plain HTTP on the TLS port is not served
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(f"http://127.0.0.1:{balancer.port}/health") as plain:
                        await plain.read()

            # Reload: the certificate is read again; connections made afterwards get the new one.
            assert await _served_certificate(balancer.port) == _pem_der(cert)
            new_cert, new_key = make_certificate(tmp_path, "renewed")
            cert.write_bytes(new_cert.read_bytes())
            key.write_bytes(new_key.read_bytes())
            assert balancer.components.reloader is not None
            result = await balancer.components.reloader.reload()
            assert result.ok, result.problems
            assert await _served_certificate(balancer.port) == _pem_der(new_cert)
            key.write_text("not a key")  # a pair that does not load changes nothing
            result = await balancer.components.reloader.reload()
            assert not result.ok and "server.tls_cert" in result.problems[0]
            assert await _served_certificate(balancer.port) == _pem_der(new_cert)


async def test_serve_answers_https_on_both_legs(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    async with run_fake_llama() as fake:
        port = free_port()
        child = balancer_process(
            ["serve", "--backend", fake.url, "--port", str(port), "--log-format", "json"],
            env={"LLMBALANCER_SERVER__TLS_CERT": str(cert), "LLMBALANCER_SERVER__TLS_KEY": str(key)},
        )
        try:
            context = ssl.create_default_context(cafile=str(cert))
            url = f"https://127.0.0.1:{port}"
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
                for _ in range(200):
                    assert child.poll() is None, (child.stdout.read() if child.stdout else b"").decode()
                    try:
                        async with session.get(url + "/health") as reply:
                            if reply.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.05)
                for _ in range(3):  # kept alive: the lean front's, then aiohttp's, then the front's again
                    async with session.post(url + "/v1/chat/completions", json={**CHAT, "stream": True}) as reply:
                        assert reply.status == 200
                        assert b"data: [DONE]" in await reply.read()
                    async with session.get(url + "/v1/models") as reply:
                        assert (await reply.json())["data"][0]["id"] == "smollm2"
        finally:
            child.terminate()
            child.wait(timeout=20)
            if child.stdout:
                child.stdout.close()
