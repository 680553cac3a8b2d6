"""Lab S3 helper: wait until the lab's SeaweedFS S3 answers with the lab keys, then ensure the bucket exists.

Usage: python lab/lab_s3.py <endpoint> <secrets_dir> <bucket> [timeout_s]
"""

import sys
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def client(endpoint, secrets):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=(secrets / "s3_access_key").read_text().strip(),
        aws_secret_access_key=(secrets / "s3_secret_key").read_text().strip(),
        config=Config(retries={"max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )


def main():
    endpoint, secrets, bucket = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 60
    s3 = client(endpoint, secrets)
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
            if bucket not in names:
                s3.create_bucket(Bucket=bucket)
            s3.head_bucket(Bucket=bucket)
            return 0
        except (BotoCoreError, ClientError) as exc:
            last = exc
            time.sleep(0.5)
    print(f"lab_s3: S3 at {endpoint} did not serve bucket {bucket} within {timeout:.0f}s: {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
