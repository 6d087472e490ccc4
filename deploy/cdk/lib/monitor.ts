// The model monitor on AWS: `sluice monitor` as an ECS scheduled task (hourly, on Fargate, the
// CPU image), reading the capture the results workers write under capture/ of the bucket and
// the true labels on the results table, keeping its alert state and reference under monitor/,
// and publishing each alert to the alarm topic.
import { Aws, CfnElement, Duration, Stack, Validations } from 'aws-cdk-lib';
import * as ec2 from 'aws-cdk-lib/aws-ec2';
import * as ecs from 'aws-cdk-lib/aws-ecs';
import * as events from 'aws-cdk-lib/aws-events';
import * as targets from 'aws-cdk-lib/aws-events-targets';
import * as iam from 'aws-cdk-lib/aws-iam';
import * as logs from 'aws-cdk-lib/aws-logs';
import * as sns from 'aws-cdk-lib/aws-sns';
import { Construct } from 'constructs';
import { DataStack } from './data-stack';
import { EnvironmentConfig } from './environments';
import { RESOURCES, resourceName } from './resources';

/** How often the checks run; each run looks at the monitor's whole window (7 days by default). */
export const MONITOR_SCHEDULE = Duration.hours(1);

export interface MonitorProps {
  data: DataStack;
  config: EnvironmentConfig;
  cluster: ecs.Cluster;
  securityGroup: ec2.SecurityGroup;
  image: ecs.ContainerImage;
  topic: sns.Topic;
  /** What every worker's container is configured with (store, prefix, region, model). */
  environment: Record<string, string>;
}

/** Objects under one key prefix of the pipeline's bucket. */
export function bucketObjects(data: DataStack, keyPrefix: string, partition: string = Aws.PARTITION): string {
  return `arn:${partition}:s3:::${resourceName(data.prefix, RESOURCES.bucket)}/${keyPrefix}*`;
}

export class ScheduledMonitor extends Construct {
  readonly role: iam.Role;
  readonly task: ecs.FargateTaskDefinition;

  constructor(scope: Construct, id: string, props: MonitorProps) {
    super(scope, id);
    const { data, config } = props;
    const bucket = resourceName(data.prefix, RESOURCES.bucket);
    this.role = new iam.Role(this, 'TaskRole', {
      assumedBy: new iam.ServicePrincipal('ecs-tasks.amazonaws.com'),
      description: 'sluice monitor: reads capture and true labels, keeps its state, publishes alerts',
    });
    const allow = (sid: string, actions: string[], resources: string[], conditions?: Record<string, unknown>) =>
      this.role.addToPolicy(new iam.PolicyStatement({ sid, actions, resources, conditions }));
    const objects = (prefix: string) => bucketObjects(data, prefix);
    // Unconditioned: S3 answers a GetObject of a missing key (no reference or alert state saved
    // yet) with 404 only to a caller that may list the bucket, else with 403; a condition on
    // s3:prefix would not hold for a GetObject. The keys are content hashes and times.
    allow('ListBucket', ['s3:ListBucket'], [`arn:${Aws.PARTITION}:s3:::${bucket}`]);
    allow('ReadCapture', ['s3:GetObject'], [objects(RESOURCES.capture_key_prefix)]);
    allow('MonitorState', ['s3:GetObject', 's3:PutObject'], [objects(RESOURCES.monitor_key_prefix)]);
    allow('ReadTrueLabels', ['dynamodb:BatchGetItem'], [data.table('results').tableArn]);
    props.topic.grantPublish(this.role);
    Validations.of(this.role).acknowledge(
      ...[RESOURCES.capture_key_prefix, RESOURCES.monitor_key_prefix].map((prefix) => ({
        id: `AwsSolutions-IAM5[Resource::${bucketObjects(data, prefix, '<AWS::Partition>')}]`,
        reason: `The monitor reads every object under ${prefix} and nothing else in the bucket; their keys are written by time and cannot be known in advance.`,
      })),
      {
        id: 'AwsSolutions-IAM5[Action::kms:GenerateDataKey*]',
        reason: 'Publishing to the encrypted alarm topic needs a data key from its own key; the grant names that key only.',
      },
    );

    this.task = new ecs.FargateTaskDefinition(this, 'Task', {
      cpu: 256,
      memoryLimitMiB: 1024,
      taskRole: this.role,
      runtimePlatform: { cpuArchitecture: ecs.CpuArchitecture.X86_64, operatingSystemFamily: ecs.OperatingSystemFamily.LINUX },
    });
    const logGroup = new logs.LogGroup(this, 'Logs', { retention: config.logRetention });
    this.task.addContainer('monitor', {
      image: props.image,
      command: ['/usr/local/bin/sluice', 'monitor'],
      environment: { ...props.environment, SLUICE__MONITOR__SNS_TOPIC_ARN: props.topic.topicArn, RUST_LOG: 'info' },
      logging: ecs.LogDrivers.awsLogs({ logGroup, streamPrefix: 'monitor' }),
      readonlyRootFilesystem: true,
      essential: true,
    });
    Validations.of(this.task).acknowledge(
      {
        id: 'AwsSolutions-IAM5[Resource::*]',
        reason: 'The execution role pulls the image: ecr:GetAuthorizationToken has no resource-level permissions, so AWS allows only "*" for it.',
      },
      { id: 'AwsSolutions-ECS2', reason: 'Environment variables hold configuration (SLUICE__…), never secrets: credentials come from the task role.' },
    );

    const stack = Stack.of(this);
    const clusterId = stack.getLogicalId(props.cluster.node.defaultChild as CfnElement);
    Validations.of(this).acknowledge({
      id: `AwsSolutions-IAM5[Resource::arn:<AWS::Partition>:ecs:${stack.region}:*:task/<${clusterId}>/*]`,
      reason: 'EventBridge tags the tasks it starts on this cluster; their ids exist only once started.',
    });
    new events.Rule(this, 'Schedule', {
      description: `sluice ${config.name}: accuracy and drift over the monitor's window, alerts to the alarm topic`,
      schedule: events.Schedule.rate(MONITOR_SCHEDULE),
      targets: [
        new targets.EcsTask({
          cluster: props.cluster,
          taskDefinition: this.task,
          securityGroups: [props.securityGroup],
          subnetSelection: { subnetType: ec2.SubnetType.PRIVATE_WITH_EGRESS },
          assignPublicIp: false,
        }),
      ],
    });
  }
}
