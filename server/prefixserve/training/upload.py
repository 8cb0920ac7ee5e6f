"""Put a trained adapter on a running prefixserve server: `PUT {url}/v1/adapters/{id}`."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from prefixserve.adapters.errors import InvalidAdapterIdError
from prefixserve.adapters.format import CONFIG_NAME, WEIGHTS_NAME
from prefixserve.adapters.ids import validate_adapter_id
from prefixserve.training.errors import TrainingError


def check_adapter_id(adapter_id: str) -> str:
    """Checked before training starts, so a bad id does not cost a whole training run."""
    try:
        return validate_adapter_id(adapter_id)
    except InvalidAdapterIdError as exc:
        raise TrainingError(f"--adapter-id: {exc}") from None


def _httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise TrainingError(
            "--upload needs httpx: pip install 'prefixserve[train]' (or pip install httpx)"
        ) from None
    return httpx


def _detail(response: Any) -> str:
    try:
        body = response.json()
        error = body.get("error", body)
        return f"{body.get('error_type', 'error')}: {error}"
    except (ValueError, AttributeError):
        return response.text[:500]


def check_server(url: str, api_key: str | None = None, timeout_s: float = 10.0, client: Any = None) -> None:
    """Before training: the server answers, and takes the key, on the route the upload will use.
    A training run is not wasted on a server that is down or a key that is wrong."""
    httpx = _httpx()
    endpoint = f"{url.rstrip('/')}/v1/adapters?limit=1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = (client or httpx).get(endpoint, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise TrainingError(
            f"--upload {url}: cannot reach the server ({exc}); start it (prefixserve serve) or fix the URL. "
            "Nothing was trained"
        ) from None
    if response.status_code in (401, 403):
        what = "refused the API key" if api_key else "wants an API key"
        raise TrainingError(
            f"--upload {url}: the server {what} (HTTP {response.status_code}, {_detail(response)}); pass a valid "
            "--api-key (or PREFIXSERVE_API_KEY). Nothing was trained"
        )
    if response.status_code >= 400:
        raise TrainingError(
            f"--upload {url}: GET /v1/adapters answered HTTP {response.status_code} ({_detail(response)}); is it "
            "a prefixserve server? Nothing was trained"
        )


def upload_adapter(
    adapter_dir: Path,
    url: str,
    adapter_id: str,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    client: Any = None,  # an httpx.Client (tests pass one with a mock transport)
) -> dict[str, Any]:
    """Send the two PEFT files once each as multipart field `files`; return the server's JSON reply."""
    httpx = _httpx()
    check_adapter_id(adapter_id)
    endpoint = f"{url.rstrip('/')}/v1/adapters/{quote(adapter_id, safe='')}"
    files = [
        ("files", (CONFIG_NAME, (adapter_dir / CONFIG_NAME).read_bytes(), "application/json")),
        ("files", (WEIGHTS_NAME, (adapter_dir / WEIGHTS_NAME).read_bytes(), "application/octet-stream")),
    ]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    saved = (
        f"the adapter is saved in {adapter_dir}; upload it later with: curl -X PUT {endpoint} "
        + ('-H "Authorization: Bearer $PREFIXSERVE_API_KEY" ' if api_key else "")
        + f"-F files=@{adapter_dir / CONFIG_NAME} -F files=@{adapter_dir / WEIGHTS_NAME}"
    )
    try:
        response = (client or httpx).put(endpoint, files=files, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise TrainingError(f"could not reach {endpoint}: {exc}; is the server running? {saved}") from None
    if response.status_code >= 400:
        hint = " (pass --api-key)" if response.status_code in (401, 403) else ""
        raise TrainingError(
            f"the server refused the upload with HTTP {response.status_code}{hint}: {_detail(response)}; {saved}"
        )
    try:
        return dict(response.json())
    except ValueError:
        return {"status_code": response.status_code}
