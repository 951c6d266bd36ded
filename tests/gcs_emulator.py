"""A local GCS server for the tests: `gcp-storage-emulator`, plus the generation headers.

  python tests/gcs_emulator.py PORT BUCKET

The emulator implements the GCS JSON API in memory. One gap matters here: its media downloads
omit the `x-goog-generation` / `x-goog-metageneration` response headers that GCS sends. gcsfs
does not need them; tensorstore does (orbax's OCDBT store reads a manifest's generation to
update it conditionally, and fails with "Malformed StorageGeneration" without it). This script
adds them to the emulator's download handler, then serves. Clients are unchanged.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - a missing object: the handler already answered 404
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    response["x-goog-stored-content-length"] = str(obj["size"])


objects.download = download_with_generation

from gcp_storage_emulator.server import create_server  # noqa: E402  (routes the patched handler)

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
