"""Where data and feature caches live: a local path, or a URI of any pyarrow filesystem (s3://,
gs://, abfs://, hdfs://). A URI's credentials and endpoint come from the environment as pyarrow
reads them (for S3: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, and AWS_ENDPOINT_URL
for an S3-compatible server). Paths inside a URI are joined with '/'."""
import functools
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_uri(path) -> bool:
    return "://" in str(path)


@functools.lru_cache(maxsize=16)
def _filesystem(root: str) -> pafs.FileSystem:
    return pafs.FileSystem.from_uri(root)[0]


def _root(uri: str) -> str:
    """scheme://bucket of a URI."""
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('/', 1)[0]}"


def resolve(path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it). A URI's filesystem is made once per scheme and bucket."""
    path = str(path)
    if not is_uri(path):
        return pafs.LocalFileSystem(), str(Path(path).absolute())
    return _filesystem(_root(path)), path.split("://", 1)[1]


def join(base, *names: str) -> str:
    if not is_uri(base):
        return str(Path(base, *names))
    return "/".join([str(base).rstrip("/"), *names])


def name(path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def info(path) -> pafs.FileInfo:
    fs, inner = resolve(path)
    return fs.get_file_info(inner)


def is_dir(path) -> bool:
    return info(path).type == pafs.FileType.Directory


def files_under(path) -> list[tuple[str, int]]:
    """(path as given under `path`, size) of every file under a folder, recursively, sorted."""
    fs, inner = resolve(path)
    found = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    base = str(path).rstrip("/")
    return sorted((join(base, f.path[len(inner.rstrip("/")) + 1:]), f.size)
                  for f in found if f.type == pafs.FileType.File)


def folders_in(path) -> list[str]:
    """The folders directly in `path`, sorted (none if it does not exist)."""
    fs, inner = resolve(path)
    found = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(join(path, f.base_name) for f in found if f.type == pafs.FileType.Directory)


def read_text(path) -> str:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path, text: str) -> None:
    fs, inner = resolve(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def chunks(path, size: int = 1 << 20):
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(size):
            yield chunk


def parquet_file(path) -> pq.ParquetFile:
    if not is_uri(path):
        return pq.ParquetFile(path)
    fs, inner = resolve(path)
    return pq.ParquetFile(inner, filesystem=fs)


def make_dirs(path) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def move(src, dst) -> None:
    fs, inner = resolve(src)
    fs.move(inner, resolve(dst)[1])


def remove_tree(path) -> None:
    fs, inner = resolve(path)
    try:
        fs.delete_dir(inner)
    except FileNotFoundError:
        pass


def parquet_dataset(paths):
    """A pyarrow dataset over a folder, or over a list of files of one filesystem."""
    import pyarrow.dataset as pads

    if not isinstance(paths, list):
        fs, inner = resolve(paths)
        return pads.dataset(inner, format="parquet", filesystem=fs)
    fs = resolve(paths[0])[0]
    return pads.dataset([resolve(p)[1] for p in paths], format="parquet", filesystem=fs)


def unreachable(path) -> str | None:
    """Why a URI's bucket (or container) cannot be used, None if it can; local paths are not checked."""
    if not is_uri(path):
        return None
    root = _root(str(path))
    try:
        found = info(root)
    except OSError as e:
        return f"{root} cannot be reached ({str(e).splitlines()[0][:300]})"
    return None if found.type == pafs.FileType.Directory else f"{root} not found"


def uri(filesystem: pafs.FileSystem, path: str) -> str:
    """A path inside a pyarrow filesystem as the URI that names it (a local path as itself)."""
    return path if isinstance(filesystem, pafs.LocalFileSystem) else f"{filesystem.type_name}://{path}"
