"""Creates a synthesized stack's resources in a local AWS stand-in (moto server) through its
CloudFormation API, and waits until they exist.

    python create_in_emulator.py --endpoint http://127.0.0.1:PORT TEMPLATE.json STACK_NAME

The template is sent as `cdk synth` wrote it, less what only matters to a real account and that
moto's CloudFormation does not take: the CDK bootstrap version check (a Rule and its
Parameter, which reads an SSM parameter `cdk bootstrap` writes) and the CDK metadata resource.
"""

import argparse
import json
import sys
import time

import boto3


def for_emulator(template: dict) -> dict:
    template = dict(template)
    template.pop("Rules", None)
    template.get("Parameters", {}).pop("BootstrapVersion", None)
    if not template.get("Parameters"):
        template.pop("Parameters", None)
    resources = template["Resources"]
    for name in [n for n, r in resources.items() if r["Type"] == "AWS::CDK::Metadata"]:
        del resources[name]
    conditions = template.get("Conditions", {})
    conditions.pop("CDKMetadataAvailable", None)
    if not conditions:
        template.pop("Conditions", None)
    return template


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--region", default="us-east-1")
    parser.add_argument("template")
    parser.add_argument("stack_name")
    args = parser.parse_args()

    with open(args.template) as f:
        template = for_emulator(json.load(f))
    cloudformation = boto3.client(
        "cloudformation",
        endpoint_url=args.endpoint,
        region_name=args.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    cloudformation.create_stack(StackName=args.stack_name, TemplateBody=json.dumps(template))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stack = cloudformation.describe_stacks(StackName=args.stack_name)["Stacks"][0]
        status = stack["StackStatus"]
        if status == "CREATE_COMPLETE":
            made = cloudformation.list_stack_resources(StackName=args.stack_name)["StackResourceSummaries"]
            for resource in sorted(made, key=lambda r: r["ResourceType"]):
                print(f'{resource["ResourceType"]}\t{resource["PhysicalResourceId"]}\t{resource["ResourceStatus"]}')
            return 0
        if status.endswith("FAILED") or status.startswith("ROLLBACK"):
            events = cloudformation.describe_stack_events(StackName=args.stack_name)["StackEvents"]
            for event in events:
                if "FAILED" in event["ResourceStatus"]:
                    print(f'{event["LogicalResourceId"]}: {event.get("ResourceStatusReason")}', file=sys.stderr)
            print(f"stack {args.stack_name}: {status}", file=sys.stderr)
            return 1
        time.sleep(0.5)
    print(f"stack {args.stack_name} not created within 120 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
