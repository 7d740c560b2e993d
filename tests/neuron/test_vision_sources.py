"""The SSRF guard on image URLs, against a local HTTP server.

Everything here is loopback, which the guard refuses, so `support.image_server.FakeNetwork`
stands in for DNS and routing; it records every connection, so a refusal is shown to happen
before any byte leaves for the refused address.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.image_server import PNG, PUBLIC, FakeNetwork, image_server

from neuron.vision.sources import FetchPolicy, ImageFetcher, ImageRefused, decode_data_uri, is_public_address


@pytest.fixture(scope="module")
def server() -> Iterator[int]:
    with image_server() as port:
        yield port


ALLOWED = frozenset(
    {"images.test", "loopback.test", "inside.test", "metadata.test", "mixed.test", "mapped.test"}
)


def fetcher(port: int, **policy: object) -> tuple[ImageFetcher, FakeNetwork]:
    network = FakeNetwork(port)
    options: dict[str, object] = {"fetch_urls": True, "allowed_hosts": ALLOWED, "timeout_secs": 5.0}
    options.update(policy)
    return ImageFetcher(FetchPolicy(network=network, **options)), network  # type: ignore[arg-type]


def refusal(fetch: ImageFetcher, url: str) -> ImageRefused:
    with pytest.raises(ImageRefused) as caught:
        fetch.load(url, "messages[0].content[1].image_url")
    assert caught.value.status == 400
    assert caught.value.param == "messages[0].content[1].image_url"
    return caught.value


def test_an_allow_listed_public_host_is_fetched_and_redirects_are_followed(server: int) -> None:
    fetch, network = fetcher(server)
    assert fetch.load("http://images.test/cat.png", "img") == PNG
    assert fetch.load("http://IMAGES.test/hop", "img") == PNG
    assert network.connected == [PUBLIC, PUBLIC, PUBLIC]


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("loopback.test", "127.0.0.1"),
        ("inside.test", "10.1.2.3"),
        ("metadata.test", "169.254.169.254"),
        ("mixed.test", "192.168.0.7"),
        ("mapped.test", "::ffff:127.0.0.1"),
    ],
)
def test_names_that_resolve_inside_are_refused_before_connecting(
    server: int, host: str, address: str
) -> None:
    fetch, network = fetcher(server)
    error = refusal(fetch, f"http://{host}/cat.png")
    assert error.code == "image_refused"
    assert f"resolves to {address}, which is not a public address" in error.message
    assert network.connected == []


def test_a_redirect_is_checked_like_the_first_url(server: int) -> None:
    fetch, network = fetcher(server)
    inside = refusal(fetch, "http://images.test/to-private")
    assert "'inside.test' resolves to 10.1.2.3" in inside.message
    unlisted = refusal(fetch, "http://images.test/to-unlisted")
    assert "host 'elsewhere.test' is not in vision.allowed_hosts" in unlisted.message
    # Only the first hop of each connected; the private target never did.
    assert network.connected == [PUBLIC, PUBLIC]
    assert (
        "more than 2 redirects"
        in refusal(fetcher(server, max_redirects=2)[0], "http://images.test/loop").message
    )


def test_hosts_off_the_list_literal_addresses_and_other_schemes_are_refused(server: int) -> None:
    fetch, network = fetcher(server)
    assert "not in vision.allowed_hosts" in refusal(fetch, "http://elsewhere.test/cat.png").message
    assert "not in vision.allowed_hosts" in refusal(fetch, f"http://127.0.0.1:{server}/cat.png").message
    assert "not in vision.allowed_hosts" in refusal(fetch, "http://169.254.169.254/latest/meta-data").message
    assert "unsupported image URL scheme 'file'" in refusal(fetch, "file:///etc/passwd").message
    assert network.connected == []


def test_fetching_is_off_unless_configured(server: int) -> None:
    fetch, network = fetcher(server, fetch_urls=False)
    assert (
        "does not fetch image URLs (vision.fetch_urls is off)"
        in refusal(fetch, "http://images.test/cat.png").message
    )
    assert network.connected == []


def test_oversize_wrong_type_and_errors_are_refused(server: int) -> None:
    fetch, _ = fetcher(server, max_bytes=4096)
    for path in ("/big-declared", "/big-undeclared"):
        error = refusal(fetch, f"http://images.test{path}")
        assert (error.code, "larger than the 4096-byte limit" in error.message) == ("image_too_large", True)
    page = refusal(fetch, "http://images.test/page")
    assert (page.code, "is text/html, not an image" in page.message) == ("image_invalid", True)
    assert "answered HTTP 404" in refusal(fetch, "http://images.test/missing").message


def test_a_slow_server_is_cut_off_at_the_deadline(server: int) -> None:
    fetch, _ = fetcher(server, timeout_secs=0.3)
    error = refusal(fetch, "http://images.test/slow")
    assert error.code == "image_fetch_failed"
    assert "took longer than 0.3 s" in error.message


def test_data_uris_are_decoded_and_checked() -> None:
    import base64

    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert decode_data_uri(uri, "img", 1 << 20) == (PNG, "image/png")
    with pytest.raises(ImageRefused, match="not valid base64"):
        decode_data_uri("data:image/png;base64,@@@", "img", 1 << 20)
    with pytest.raises(ImageRefused, match="'text/plain' is not an image"):
        decode_data_uri("data:text/plain;base64,aGk=", "img", 1 << 20)
    with pytest.raises(ImageRefused, match="larger than the 100-byte limit"):
        decode_data_uri(uri, "img", 100)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.0.0.1", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:10.0.0.1", False),
        ("224.0.0.1", False),
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public
