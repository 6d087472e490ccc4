// What the deployment promises, checked on the synthesized templates of both environments.
import * as assert from 'node:assert/strict';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { describe, it } from 'node:test';
import { App } from 'aws-cdk-lib';
import { Match, Template } from 'aws-cdk-lib/assertions';
import { IRole } from 'aws-cdk-lib/aws-iam';
import { AwsSolutionsChecks } from 'cdk-nag';
import { SluiceStacks, buildStacks } from '../lib/app';
import { ENVIRONMENTS, EnvironmentConfig } from '../lib/environments';
import { REPO_ROOT, RESOURCES, STAGES, Stage, configNumber, resourceName } from '../lib/resources';
import { BACKENDS, BREAKER_OPEN, COLLECTOR_IMAGE, EMF_UNITS, METRICS } from '../lib/telemetry';

type Resource = { Type: string; Properties: Record<string, any>; DeletionPolicy?: string };

// A stand-in for the fallback's model.tar.gz: the app only hashes and uploads it.
const model = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'sluice-cdk-')), 'model.tar.gz');
fs.writeFileSync(model, 'not a real model');

function synth(env: 'beta' | 'prod', extra: Record<string, string> = {}, overrides: Partial<EnvironmentConfig> = {}) {
  // Image URIs: the unit tests need no Docker build context staged.
  const app = new App({ context: { env, fallbackModel: model, image: 'sluice:test', cudaImage: 'sluice-cuda:test', ...extra } });
  const stacks = buildStacks(app, { account: '123456789012', region: 'eu-west-1' }, overrides);
  return { stacks, data: Template.fromStack(stacks.data), compute: Template.fromStack(stacks.compute) };
}

const beta = synth('beta');
const prod = synth('prod');

function resources(template: Template, type: string): [string, Resource][] {
  return Object.entries(template.findResources(type) as Record<string, Resource>);
}

/** The logical id of the data stack's resource named `name` (queue, table…). */
function logicalIdOf(template: Template, type: string, nameKey: string, name: string): string {
  const found = resources(template, type).find(([, r]) => r.Properties[nameKey] === name);
  assert.ok(found, `no ${type} named ${name}`);
  return found[0];
}

/** Every logical id of the data stack a policy document mentions (through cross-stack imports). */
function referencedIds(value: unknown): string[] {
  const text = JSON.stringify(value);
  return [...text.matchAll(/ExportsOutputFnGetAtt([A-Za-z0-9]+?)[0-9A-F]{8}(Arn|QueueName|StreamArn)/g)].map((m) => m[1]);
}

type Container = { Name: string; Command?: string[]; Environment: { Name: string; Value: any }[]; [key: string]: any };

/** Each worker's task definition: its worker container (the first) and the rest. */
function workerTasks(template: Template): { stage: Stage; worker: Container; others: Container[] }[] {
  return resources(template, 'AWS::ECS::TaskDefinition')
    .map(([, task]) => {
      const [worker, ...others] = task.Properties.ContainerDefinitions as Container[];
      return { stage: worker.Name as Stage, worker, others };
    })
    .filter((task) => STAGES.includes(task.stage));
}

/** The scalable target of the ECS service whose logical id starts with `service` ('Ingest'…). */
function scalingOf(template: Template, service: string): [string, Resource] {
  const found = resources(template, 'AWS::ApplicationAutoScaling::ScalableTarget').find(([, t]) =>
    JSON.stringify(t.Properties.ResourceId).includes(`{"Fn::GetAtt":["${service}Service`),
  );
  assert.ok(found, `no scalable target for the ${service} service`);
  return found;
}

function variable(container: Container, name: string): any {
  return container.Environment.find((e) => e.Name === name)?.Value;
}

/** The string constants of a Rust source file of the workers, by value. */
function rustStrings(file: string): Set<string> {
  const source = fs.readFileSync(path.join(REPO_ROOT, file), 'utf8');
  return new Set([...source.matchAll(/"([a-z][a-z0-9_.-]*)"/g)].map((m) => m[1]));
}

function taskRolePolicy(stacks: SluiceStacks, template: Template, stage: Stage): any[] {
  return rolePolicy(stacks, template, stacks.compute.taskRoles.get(stage)!);
}

function rolePolicy(stacks: SluiceStacks, template: Template, role: IRole): any[] {
  const roleId = stacks.compute.getLogicalId(role.node.defaultChild as any);
  const policies = resources(template, 'AWS::IAM::Policy').filter(([, p]) =>
    (p.Properties.Roles as any[]).some((r) => r.Ref === roleId),
  );
  return policies.flatMap(([, p]) => p.Properties.PolicyDocument.Statement);
}

for (const [env, synthed] of [['beta', beta], ['prod', prod]] as const) {
  describe(`${env}`, () => {
    const prefix = `sluice-${env}`;
    const { data, compute, stacks } = synthed;

    it('names every resource as the workers expect from their prefix', () => {
      data.hasResourceProperties('AWS::Kinesis::Stream', { Name: resourceName(prefix, RESOURCES.stream) });
      for (const queue of Object.values(RESOURCES.queues)) {
        data.hasResourceProperties('AWS::SQS::Queue', { QueueName: resourceName(prefix, queue) });
      }
      for (const table of Object.values(RESOURCES.tables)) {
        data.hasResourceProperties('AWS::DynamoDB::Table', {
          TableName: resourceName(prefix, table.name),
          KeySchema: [{ AttributeName: table.key, KeyType: 'HASH' }],
        });
      }
      data.hasResourceProperties('AWS::S3::Bucket', { BucketName: resourceName(prefix, RESOURCES.bucket) });
      for (const [, service] of resources(compute, 'AWS::ECS::TaskDefinition')) {
        const env = service.Properties.ContainerDefinitions[0].Environment as { Name: string; Value: unknown }[];
        assert.deepEqual(env.find((e) => e.Name === 'SLUICE__STORE__AWS__PREFIX')?.Value, prefix);
      }
    });

    it('gives every work queue a DLQ, keeps every message 14 days with an alarm before, and encrypts every queue and lets it take 1 MiB messages', () => {
      for (const [queue, dlq] of Object.entries(RESOURCES.redrive)) {
        const dlqId = logicalIdOf(data, 'AWS::SQS::Queue', 'QueueName', resourceName(prefix, dlq));
        const [, work] = resources(data, 'AWS::SQS::Queue').find(([, r]) => r.Properties.QueueName === resourceName(prefix, queue))!;
        assert.deepEqual(work.Properties.RedrivePolicy, {
          deadLetterTargetArn: { 'Fn::GetAtt': [dlqId, 'Arn'] },
          maxReceiveCount: configNumber('store.max_receives'),
        });
      }
      // SQS drops a message past its retention without a DLQ entry: every queue keeps SQS's most.
      for (const [, queue] of resources(data, 'AWS::SQS::Queue')) {
        assert.equal(queue.Properties.MessageRetentionPeriod, 14 * 24 * 3600, queue.Properties.QueueName);
        assert.equal(queue.Properties.SqsManagedSseEnabled, true, queue.Properties.QueueName);
        // SQS's largest messages: photo-sized envelopes travel inline, eight to a batch call.
        assert.equal(queue.Properties.MaximumMessageSize, 1048576, queue.Properties.QueueName);
      }
    });

    it('keeps tables recoverable, encrypted and on demand, with TTL where the workers write it', () => {
      for (const [, table] of resources(data, 'AWS::DynamoDB::Table')) {
        assert.deepEqual(table.Properties.PointInTimeRecoverySpecification, { PointInTimeRecoveryEnabled: true });
        assert.equal(table.Properties.BillingMode, 'PAY_PER_REQUEST');
        assert.equal(table.Properties.SSESpecification.SSEEnabled, true);
      }
      for (const table of [RESOURCES.tables.results, RESOURCES.tables.features]) {
        data.hasResourceProperties('AWS::DynamoDB::Table', {
          TableName: resourceName(prefix, table.name),
          TimeToLiveSpecification: { AttributeName: table.ttl_attribute, Enabled: true },
        });
      }
      // Feature vectors expire with the claim-checks (which outlive a work queue and its DLQ):
      // a replay of an inference DLQ entry finds its vector.
      for (const { stage, worker } of workerTasks(compute)) {
        assert.equal(
          variable(worker, 'SLUICE__STORE__AWS__FEATURE_TTL_DAYS'),
          String(ENVIRONMENTS[env].claimCheckExpiry.toDays()),
          stage,
        );
      }
    });

    it('indexes results by status in store order, as the results API queries them', () => {
      const index = RESOURCES.tables.results.index!;
      data.hasResourceProperties('AWS::DynamoDB::Table', {
        TableName: resourceName(prefix, RESOURCES.tables.results.name),
        GlobalSecondaryIndexes: [
          {
            IndexName: index.name,
            KeySchema: [
              { AttributeName: index.partition, KeyType: 'HASH' },
              { AttributeName: index.sort, KeyType: 'RANGE' },
            ],
            Projection: { ProjectionType: 'ALL' },
          },
        ],
      });
    });

    it('locks the claim-check bucket down and expires claim-checks', () => {
      data.hasResourceProperties('AWS::S3::Bucket', {
        PublicAccessBlockConfiguration: { BlockPublicAcls: true, BlockPublicPolicy: true, IgnorePublicAcls: true, RestrictPublicBuckets: true },
        LifecycleConfiguration: {
          Rules: [
            { Prefix: RESOURCES.claim_check_key_prefix, Status: 'Enabled', ExpirationInDays: ENVIRONMENTS[env].claimCheckExpiry.toDays() },
            { Prefix: RESOURCES.capture_key_prefix, Status: 'Enabled', ExpirationInDays: ENVIRONMENTS[env].captureExpiry.toDays() },
            {},
          ],
        },
      });
      assert.ok(ENVIRONMENTS[env].claimCheckExpiry.toDays() > ENVIRONMENTS[env].streamRetention.toDays() + 14 + 14, 'claim-checks outlive the stream, then a work queue and its DLQ');
      assert.ok(ENVIRONMENTS[env].captureExpiry.toDays() > 7, 'capture outlives the monitor window');
      const [, policy] = resources(data, 'AWS::S3::BucketPolicy')[0];
      const denyInsecure = policy.Properties.PolicyDocument.Statement.find((s: any) => s.Effect === 'Deny');
      assert.deepEqual(denyInsecure.Condition, { Bool: { 'aws:SecureTransport': 'false' } });
    });

    it('scales every SQS-fed service on backlog per task', () => {
      const policies = resources(compute, 'AWS::ApplicationAutoScaling::ScalingPolicy').filter(
        ([, p]) => p.Properties.PolicyType === 'TargetTrackingScaling',
      );
      const fed = STAGES.filter((s) => RESOURCES.stages[s].input);
      assert.equal(policies.length, fed.length);
      for (const stage of fed) {
        const [, policy] = policies.find(([, p]) => p.Properties.PolicyName === `${prefix}-${stage}-backlog-per-task`)!;
        const config = policy.Properties.TargetTrackingScalingPolicyConfiguration;
        const metrics = config.CustomizedMetricSpecification.Metrics;
        const visible = metrics.find((m: any) => m.Id === 'visible').MetricStat.Metric;
        assert.equal(visible.MetricName, 'ApproximateNumberOfMessagesVisible');
        const queueId = logicalIdOf(data, 'AWS::SQS::Queue', 'QueueName', resourceName(prefix, RESOURCES.stages[stage].input!));
        assert.deepEqual(referencedIds(visible.Dimensions), [queueId.replace(/[0-9A-F]{8}$/, '')]);
        assert.equal(metrics.find((m: any) => m.Id === 'tasks').MetricStat.Metric.MetricName, 'RunningTaskCount');
        assert.match(metrics.find((m: any) => m.ReturnData === true).Expression, /visible \/ .*tasks/);
        assert.ok(config.TargetValue >= 1, `${stage} target ${config.TargetValue}`);
      }
    });

    it('runs ingest with at most one task per shard and scales it on iterator age', () => {
      const shards = ENVIRONMENTS[env].shards as number;
      const [targetId, target] = scalingOf(compute, 'Ingest');
      assert.equal(target.Properties.MaxCapacity, Math.min(shards, ENVIRONMENTS[env].workers.ingest.maxTasks));
      const policies = resources(compute, 'AWS::ApplicationAutoScaling::ScalingPolicy')
        .filter(([, p]) => p.Properties.ScalingTargetId?.Ref === targetId)
        .map(([, p]) => p.Properties.PolicyType);
      assert.deepEqual(policies, ['StepScaling', 'StepScaling'], 'ingest scales up and down on iterator age');
      compute.hasResourceProperties('AWS::CloudWatch::Alarm', { MetricName: 'GetRecords.IteratorAgeMilliseconds', Threshold: 60000 });
      // More ingest tasks allowed than there are shards: one a shard, the rest would sit idle.
      const workers = { ...ENVIRONMENTS[env].workers, ingest: { ...ENVIRONMENTS[env].workers.ingest, maxTasks: shards + 3 } };
      const [, capped] = scalingOf(synth(env, {}, { workers }).compute, 'Ingest');
      assert.equal(capped.Properties.MaxCapacity, shards);
    });

    it('grants each worker only its own stage queues, and consuming only from its input', () => {
      const queueIds = new Map(
        Object.values(RESOURCES.queues).map((q) => [
          logicalIdOf(data, 'AWS::SQS::Queue', 'QueueName', resourceName(prefix, q)).replace(/[0-9A-F]{8}$/, ''),
          q,
        ]),
      );
      for (const stage of STAGES) {
        const spec = RESOURCES.stages[stage];
        const statements = taskRolePolicy(stacks, compute, stage);
        const queuesIn = (pred: (s: any) => boolean) =>
          new Set(statements.filter(pred).flatMap((s) => referencedIds(s.Resource)).filter((id) => queueIds.has(id)).map((id) => queueIds.get(id)));
        const actions = (s: any) => [s.Action].flat() as string[];
        assert.deepEqual(queuesIn((s) => actions(s).some((a) => a.startsWith('sqs:'))), new Set([spec.input, ...spec.sends, spec.dlq].filter(Boolean)), stage);
        assert.deepEqual(queuesIn((s) => actions(s).includes('sqs:ReceiveMessage')), new Set(spec.input ? [spec.input] : []), stage);
        // A large send asks its queue's MaximumMessageSize; the DLQ depths are sampled.
        assert.deepEqual(queuesIn((s) => actions(s).includes('sqs:GetQueueAttributes')), new Set([spec.input, ...spec.sends, spec.dlq].filter(Boolean)), stage);
        for (const s of statements) {
          assert.ok(!actions(s).some((a) => a.endsWith('*')), `${stage}: wildcard action ${actions(s)}`);
        }
        // Listing is what makes a gone claim-check NoSuchKey, not AccessDenied; a GetObject
        // carries no s3:prefix, so the grant holds only unconditioned.
        const lists = statements.filter((s) => actions(s).includes('s3:ListBucket'));
        assert.deepEqual(lists.map((s) => s.Condition), [undefined], stage);
        // X-Ray's calls take no resource: the collector's are the only statement on "*".
        const everywhere = statements.filter((s) => s.Resource === '*').map((s) => actions(s).sort());
        assert.deepEqual(everywhere, [['xray:PutTelemetryRecords', 'xray:PutTraceSegments']], stage);
      }
    });

    it('runs at most one GPU task per GPU instance, and replaces them in place', () => {
      const [, service] = resources(compute, 'AWS::ECS::Service').find(([, r]) => r.Properties.CapacityProviderStrategy)!;
      assert.deepEqual(service.Properties.DeploymentConfiguration.MinimumHealthyPercent, 50);
      assert.deepEqual(service.Properties.DeploymentConfiguration.MaximumPercent, 100);
      const [, target] = scalingOf(compute, 'Inference');
      assert.equal(target.Properties.MaxCapacity, Math.min(ENVIRONMENTS[env].workers.inference.maxTasks, ENVIRONMENTS[env].gpu.maxInstances));
      compute.hasResourceProperties('AWS::AutoScaling::AutoScalingGroup', { MaxSize: String(ENVIRONMENTS[env].gpu.maxInstances) });
    });

    it('pulls pushed ECR images through a grant to the execution role', () => {
      const uri = '123456789012.dkr.ecr.eu-west-1.amazonaws.com/sluice:abc';
      const pushed = synth(env, { image: uri, fallbackImage: '123456789012.dkr.ecr.eu-west-1.amazonaws.com/xgb:1' }).compute;
      const pulls = JSON.stringify(pushed.findResources('AWS::IAM::Policy'));
      assert.match(pulls, /ecr:BatchGetImage/);
      assert.match(pulls, /repository\/sluice"/);
      assert.match(pulls, /repository\/xgb"/, 'the fallback override is pulled too');
      pushed.hasResourceProperties('AWS::ECS::TaskDefinition', {
        ContainerDefinitions: Match.arrayWith([
          Match.objectLike({ Command: ['/usr/local/bin/sluice-ingest'], Image: { 'Fn::Join': ['', ['123456789012.dkr.ecr.eu-west-1.', { Ref: 'AWS::URLSuffix' }, '/sluice:abc']] } }),
        ]),
      });
    });

    it('asks for a GPU for inference by default, and runs it on Fargate with inference=cpu', () => {
      compute.hasResourceProperties('AWS::ECS::TaskDefinition', {
        ContainerDefinitions: Match.arrayWith([
          Match.objectLike({ Command: ['/usr/local/bin/sluice-inference'], ResourceRequirements: [{ Type: 'GPU', Value: '1' }] }),
        ]),
        RequiresCompatibilities: ['EC2'],
      });
      compute.hasResourceProperties('AWS::ECS::CapacityProvider', {});
      const cpu = synth(env, { inference: 'cpu' }).compute;
      cpu.resourceCountIs('AWS::ECS::CapacityProvider', 0);
      cpu.hasResourceProperties('AWS::ECS::TaskDefinition', {
        ContainerDefinitions: Match.arrayWith([Match.objectLike({ Command: ['/usr/local/bin/sluice-inference'] })]),
        RequiresCompatibilities: ['FARGATE'],
      });
    });

    it('runs workers read-only, health-checked, stopping within the stop timeout, with logs kept', () => {
      const grace = (c: any) => Number(c.Environment.find((e: any) => e.Name === 'SLUICE__WORKER__SHUTDOWN_GRACE_MS').Value);
      for (const { worker: container } of workerTasks(compute)) {
        assert.equal(container.ReadonlyRootFilesystem, true);
        assert.ok(grace(container) < container.StopTimeout * 1000, 'the grace period ends before SIGKILL');
        assert.equal(container.LogConfiguration.LogDriver, 'awslogs');
        assert.deepEqual(container.HealthCheck.Command, ['CMD', container.Command?.[0], '--healthcheck']);
      }
      for (const [, group] of resources(compute, 'AWS::Logs::LogGroup')) assert.ok(group.Properties.RetentionInDays > 0);
    });

    it('alarms on every DLQ, a stalled input queue, a message near its expiry, the review backlog and iterator age, to one topic', () => {
      for (const stage of STAGES) {
        compute.hasResourceProperties('AWS::CloudWatch::Alarm', { AlarmName: `${prefix}-${stage}-dlq-not-empty`, Threshold: 0 });
      }
      compute.hasResourceProperties('AWS::CloudWatch::Alarm', { AlarmName: `${prefix}-review-backlog` });
      for (const stage of STAGES.filter((s) => RESOURCES.stages[s].input)) {
        compute.hasResourceProperties('AWS::CloudWatch::Alarm', {
          AlarmName: `${prefix}-${stage}-queue-stalled`,
          MetricName: 'ApproximateAgeOfOldestMessage',
          Threshold: 900,
        });
      }
      // Every queue, work, DLQ and review: 4 days before SQS drops a message unrecorded.
      for (const queue of Object.keys(RESOURCES.queues)) {
        compute.hasResourceProperties('AWS::CloudWatch::Alarm', {
          AlarmName: `${prefix}-${queue}-near-expiry`,
          MetricName: 'ApproximateAgeOfOldestMessage',
          Threshold: 10 * 24 * 3600,
        });
      }
      for (const [, alarm] of resources(compute, 'AWS::CloudWatch::Alarm')) assert.equal(alarm.Properties.AlarmActions.length, 1);
    });

    it('wires the SageMaker fallback into the inference service', () => {
      compute.hasResourceProperties('AWS::SageMaker::Endpoint', { EndpointName: `${prefix}-fallback` });
      const endpointId = resources(compute, 'AWS::SageMaker::Endpoint')[0][0];
      const [, task] = resources(compute, 'AWS::ECS::TaskDefinition').find(
        ([, t]) => t.Properties.ContainerDefinitions[0].Command[0] === '/usr/local/bin/sluice-inference',
      )!;
      const variable = task.Properties.ContainerDefinitions[0].Environment.find(
        (e: any) => e.Name === 'SLUICE__INFERENCE__SAGEMAKER__ENDPOINT_NAME',
      );
      assert.deepEqual(variable.Value, { 'Fn::GetAtt': [endpointId, 'EndpointName'] });
      const statements = taskRolePolicy(stacks, compute, 'inference');
      assert.ok(statements.some((s) => s.Action === 'sagemaker:InvokeEndpoint'));
    });

    it('runs an ADOT collector beside every worker, sending metrics to CloudWatch and traces to X-Ray', () => {
      const tasks = workerTasks(compute);
      assert.deepEqual(tasks.map((t) => t.stage).sort(), [...STAGES].sort());
      for (const { stage, worker, others } of tasks) {
        assert.equal(others.length, 1, `${stage}: one sidecar`);
        const [collector] = others;
        assert.equal(collector.Image, COLLECTOR_IMAGE);
        assert.match(collector.Image, /:v\d+\.\d+\.\d+$/, 'a pinned version');
        assert.equal(collector.Essential, false, 'a collector that fails leaves the worker running');
        assert.equal(collector.LogConfiguration.LogDriver, 'awslogs');
        assert.deepEqual(collector.LogConfiguration.Options['awslogs-group'], worker.LogConfiguration.Options['awslogs-group']);
        assert.ok(collector.Cpu > 0 && collector.MemoryReservation > 0 && collector.Memory >= collector.MemoryReservation);
        assert.deepEqual(worker.DependsOn, [{ ContainerName: collector.Name, Condition: 'START' }], 'the worker stops first, and flushes');

        assert.equal(variable(worker, 'OTEL_EXPORTER_OTLP_ENDPOINT'), 'http://localhost:4318');
        assert.equal(variable(worker, 'OTEL_SERVICE_NAME'), `sluice-${stage}`);
        assert.equal(variable(worker, 'OTEL_RESOURCE_ATTRIBUTES'), `deployment.environment=${env}`);
        assert.equal(variable(worker, 'OTEL_TRACES_SAMPLER_ARG'), String(ENVIRONMENTS[env].telemetry.traceSampleRatio));

        const config = JSON.parse(variable(collector, 'AOT_CONFIG_CONTENT'));
        assert.equal(config.receivers.otlp.protocols.http.endpoint, 'localhost:4318');
        const emf = config.exporters.awsemf;
        assert.equal(emf.namespace, `sluice/${prefix}`);
        assert.equal(emf.log_group_name, `/sluice/${prefix}/metrics`);
        assert.equal(emf.dimension_rollup_option, 'NoDimensionRollup');
        assert.deepEqual(emf.metric_declarations.flatMap((d: any) => d.dimensions), [['stage'], ['backend'], []]);
        assert.deepEqual(config.service.pipelines.metrics.exporters, ['awsemf']);
        assert.deepEqual(config.service.pipelines.traces.exporters, ['awsxray']);
        assert.ok('awsxray' in config.exporters);
      }
    });

    it('lets the collectors write only to the metrics log group, which it keeps with retention', () => {
      const [groupId, group] = resources(compute, 'AWS::Logs::LogGroup').find(([, g]) => g.Properties.LogGroupName === `/sluice/${prefix}/metrics`)!;
      assert.equal(group.Properties.RetentionInDays, ENVIRONMENTS[env].logRetention);
      for (const stage of STAGES) {
        const statements = taskRolePolicy(stacks, compute, stage);
        const logs = statements.filter((s) => [s.Action].flat().some((a: string) => a.startsWith('logs:')));
        assert.deepEqual(logs.map((s) => s.Resource), [{ 'Fn::GetAtt': [groupId, 'Arn'] }], stage);
        assert.ok(logs[0].Action.includes('logs:PutLogEvents'), stage);
      }
    });

    it('alarms when the SageMaker fallback scores more than its share of records, or the breaker stays open', () => {
      const namespace = `sluice/${prefix}`;
      const [, share] = resources(compute, 'AWS::CloudWatch::Alarm').find(([, a]) => a.Properties.AlarmName === `${prefix}-inference-fallback-share`)!;
      const { Metrics: metrics, ...props } = share.Properties;
      assert.equal(props.Threshold, ENVIRONMENTS[env].telemetry.fallbackShareAlarm);
      assert.equal(props.ComparisonOperator, 'GreaterThanThreshold');
      assert.equal(props.EvaluationPeriods, 3);
      assert.equal(props.DatapointsToAlarm, 3);
      assert.equal(props.TreatMissingData, 'notBreaching');
      assert.match(props.AlarmDescription, /Candle/);
      assert.match(props.AlarmDescription, /sluice_breaker_state/);
      const expression = metrics.find((m: any) => m.ReturnData !== false).Expression;
      assert.equal(expression, 'FILL(sagemaker, 0) / (FILL(cpu, 0) + FILL(cuda, 0) + FILL(sagemaker, 0))');
      const backends = Object.fromEntries(
        metrics.filter((m: any) => m.MetricStat).map((m: any) => {
          const { Metric: metric, Period: period, Stat: stat } = m.MetricStat;
          assert.deepEqual([metric.Namespace, metric.MetricName, period, stat], [namespace, METRICS.inferenceRecords, 300, 'Sum']);
          return [m.Id, metric.Dimensions.find((d: any) => d.Name === 'backend').Value];
        }),
      );
      assert.deepEqual(backends, { cpu: BACKENDS.candleCpu, cuda: BACKENDS.candleCuda, sagemaker: BACKENDS.sagemaker });
      compute.hasResourceProperties('AWS::CloudWatch::Alarm', {
        AlarmName: `${prefix}-inference-breaker-open`,
        Namespace: namespace,
        MetricName: METRICS.breakerState,
        Statistic: 'Maximum',
        Threshold: BREAKER_OPEN,
        ComparisonOperator: 'GreaterThanOrEqualToThreshold',
        EvaluationPeriods: 3,
      });
      compute.hasResourceProperties('AWS::CloudWatch::Alarm', {
        AlarmName: `${prefix}-stream-trimmed`,
        Namespace: namespace,
        MetricName: METRICS.streamTrimmed,
        Statistic: 'Sum',
        Threshold: 0,
      });
    });

    it('runs no collector, and no alarm on its metrics, with telemetry.collector off', () => {
      const off = synth(env, {}, { telemetry: { ...ENVIRONMENTS[env].telemetry, collector: false } });
      for (const { stage, worker, others } of workerTasks(off.compute)) {
        assert.deepEqual(others, [], stage);
        assert.equal(worker.DependsOn, undefined, stage);
        assert.ok(!worker.Environment.some((e) => e.Name.startsWith('OTEL_')), `${stage}: no OTLP export`);
        const statements = taskRolePolicy(off.stacks, off.compute, stage);
        assert.ok(!statements.some((s) => s.Resource === '*'), stage);
      }
      assert.ok(!JSON.stringify(off.compute.toJSON()).includes(COLLECTOR_IMAGE));
      assert.ok(!JSON.stringify(off.compute.findResources('AWS::CloudWatch::Alarm')).includes('sluice.'));
      off.compute.resourcePropertiesCountIs('AWS::Logs::LogGroup', { LogGroupName: `/sluice/${prefix}/metrics` }, 0);
      const report = new AwsSolutionsChecks().validateScope(off.stacks.compute);
      assert.deepEqual(report.violations.map((v) => v.ruleName), []);
    });

    it('runs the model monitor hourly: reads capture and true labels, keeps its state, alerts to the alarm topic', () => {
      const rules = resources(compute, 'AWS::Events::Rule').filter(([, r]) => r.Properties.ScheduleExpression === 'rate(1 hour)');
      assert.equal(rules.length, 1);
      const [container] = resources(compute, 'AWS::ECS::TaskDefinition')
        .map(([, t]) => (t.Properties.ContainerDefinitions as Container[])[0])
        .filter((c) => c.Name === 'monitor');
      assert.deepEqual(container.Command, ['/usr/local/bin/sluice', 'monitor']);
      assert.equal(variable(container, 'SLUICE__STORE__AWS__PREFIX'), prefix);
      assert.ok(variable(container, 'SLUICE__MONITOR__SNS_TOPIC_ARN'), 'alerts go to the alarm topic');
      const statements = rolePolicy(stacks, compute, stacks.compute.monitor.role);
      const granted = (action: string) =>
        statements.filter((s) => [s.Action].flat().includes(action)).map((s) => JSON.stringify(s.Resource) + JSON.stringify(s.Condition ?? {}));
      // Listing is what makes S3 answer a missing reference or alert state with 404, not 403.
      assert.deepEqual(granted('s3:ListBucket').map((r) => r.endsWith('{}')), [true], 'lists the bucket, unconditioned');
      assert.ok(granted('s3:GetObject').some((r) => r.includes(`/${RESOURCES.capture_key_prefix}*`)));
      assert.ok(granted('s3:PutObject').every((r) => r.includes(`/${RESOURCES.monitor_key_prefix}*`)), 'writes its own state only');
      assert.equal(granted('dynamodb:BatchGetItem').length, 1);
      assert.equal(granted('sns:Publish').length, 1);
      // The results workers write the capture the monitor reads.
      const results = taskRolePolicy(stacks, compute, 'results');
      assert.ok(
        results.some((s) => [s.Action].flat().includes('s3:PutObject') && JSON.stringify(s.Resource).includes(`/${RESOURCES.capture_key_prefix}*`)),
      );
    });

    it('leaves no cdk-nag AwsSolutions finding unacknowledged', () => {
      for (const stack of [stacks.data, stacks.compute]) {
        const report = new AwsSolutionsChecks().validateScope(stack);
        assert.deepEqual(report.violations.map((v) => `${v.ruleName}: ${v.violatingResources.map((r) => r.resourceLogicalId)}`), []);
      }
    });
  });
}

describe('environments', () => {
  it('keeps prod data through deletion and sizes it above beta', () => {
    for (const [, table] of resources(prod.data, 'AWS::DynamoDB::Table')) {
      assert.equal(table.DeletionPolicy, 'Retain');
      assert.equal(table.Properties.DeletionProtectionEnabled, true);
    }
    for (const type of ['AWS::Kinesis::Stream', 'AWS::S3::Bucket', 'AWS::SQS::Queue']) {
      for (const [, r] of resources(prod.data, type)) assert.equal(r.DeletionPolicy, 'Retain', type);
      for (const [, r] of resources(beta.data, type)) assert.equal(r.DeletionPolicy, 'Delete', type);
    }
    assert.equal(prod.stacks.data.terminationProtection, true);
    for (const stage of STAGES) {
      assert.ok(ENVIRONMENTS.prod.workers[stage].maxTasks > ENVIRONMENTS.beta.workers[stage].maxTasks, stage);
    }
  });

  it('names the metrics and backends the workers report', () => {
    const metrics = rustStrings('core/src/telemetry/metrics.rs');
    for (const name of [...Object.values(METRICS), ...Object.keys(EMF_UNITS)]) assert.ok(metrics.has(name), `${name} in metrics.rs`);
    assert.ok(rustStrings('inference/src/sagemaker.rs').has(BACKENDS.sagemaker));
    const candle = rustStrings('inference/src/model/mod.rs');
    assert.ok(candle.has(BACKENDS.candleCpu) && candle.has(BACKENDS.candleCuda));
    for (const label of ['stage', 'backend']) assert.ok(metrics.has(label), `label ${label}`);
  });

  it('tells CloudWatch the unit of every worker metric whose unit it would not take', () => {
    const source = fs.readFileSync(path.join(REPO_ROOT, 'core/src/telemetry/metrics.rs'), 'utf8');
    const names = new Map([...source.matchAll(/pub const ([A-Z_]+): &str = "(sluice\.[a-z0-9_.]+)";/g)].map((m) => [m[1], m[2]]));
    // Given as `counter(NAME, "{unit}", …)` or `…(NAME).with_unit("{unit}")`.
    const units = [
      ...source.matchAll(/counter\(\s*([A-Z_]+),\s*"([^"]*)"/g),
      ...source.matchAll(/\(([A-Z_]+)\)\s*\.with_unit\("([^"]*)"\)/g),
    ].map((m) => [names.get(m[1]), m[2]] as const);
    // The scheduled monitor's own: its task exports no metrics (no OTEL_* variables).
    const monitorOnly = new Set(['sluice.model.accuracy', 'sluice.drift.psi', 'sluice.monitor.alerts']);
    const annotated = units.filter(([name, unit]) => name && !monitorOnly.has(name) && (unit === '1' || unit.startsWith('{')));
    assert.ok(annotated.length >= 10, `units found: ${JSON.stringify(units)}`);
    for (const [name] of annotated) assert.ok(name! in EMF_UNITS, `${name} in EMF_UNITS`);
  });

  it('names both stacks after the prefix, so two deployments of one environment can share an account', () => {
    assert.deepEqual([beta.stacks.data.stackName, beta.stacks.compute.stackName], ['sluice-beta-data', 'sluice-beta-compute']);
    const other = synth('beta', { prefix: 'team-a' });
    assert.deepEqual([other.stacks.data.stackName, other.stacks.compute.stackName], ['team-a-data', 'team-a-compute']);
    const kept = synth('beta', { prefix: 'team-a', stacks: 'sluice-beta' });
    assert.deepEqual([kept.stacks.data.stackName, kept.stacks.compute.stackName], ['sluice-beta-data', 'sluice-beta-compute']);
  });

  it("gives ingest a producer's id field, and ingest and features read of its buckets, where asked", () => {
    const { stacks, compute } = synth('beta', { recordIdField: 'event_id', claimCheckBuckets: 'producer-a, producer-b' });
    for (const { stage, worker } of workerTasks(compute)) {
      assert.equal(variable(worker, 'SLUICE__INGEST__RECORD_ID_FIELD'), stage === 'ingest' ? 'event_id' : undefined, stage);
      assert.equal(variable(worker, 'SLUICE__STORE__AWS__CLAIM_CHECK_BUCKETS'), '["producer-a","producer-b"]', stage);
      const policy = JSON.stringify(taskRolePolicy(stacks, compute, stage));
      const reads = stage === 'ingest' || stage === 'features';
      assert.equal(policy.includes(':s3:::producer-b/*'), reads, stage);
      assert.equal(policy.includes(':s3:::producer-b"'), reads, `${stage} lists the bucket`);
    }
    for (const { worker } of workerTasks(beta.compute)) {
      assert.equal(variable(worker, 'SLUICE__STORE__AWS__CLAIM_CHECK_BUCKETS'), undefined);
      assert.equal(variable(worker, 'SLUICE__INGEST__RECORD_ID_FIELD'), undefined);
    }
    assert.throws(() => synth('beta', { claimCheckBuckets: 'Not_A_Bucket' }), /names no bucket/);
    assert.throws(() => synth('beta', { claimCheckBuckets: 'shared/team-*' }), /not a pattern/);
  });

  it('moves feature vectors over -c inlineVectorBytes to S3, and refuses more than an item holds', () => {
    const { compute } = synth('beta', { inlineVectorBytes: '20000' });
    for (const { stage, worker } of workerTasks(compute)) {
      assert.equal(variable(worker, 'SLUICE__STORE__AWS__INLINE_VECTOR_BYTES'), '20000', stage);
    }
    for (const { worker } of workerTasks(beta.compute)) assert.equal(variable(worker, 'SLUICE__STORE__AWS__INLINE_VECTOR_BYTES'), undefined);
    assert.throws(() => synth('beta', { inlineVectorBytes: '400000' }), /at most 380000/);
    assert.throws(() => synth('beta', { inlineVectorBytes: '20k' }), /at most 380000/);
  });

  it("reads only a producer's part of a shared bucket where the entry names a key prefix", () => {
    const { stacks, compute } = synth('beta', { claimCheckBuckets: 'shared/team-a/' });
    for (const { stage, worker } of workerTasks(compute)) {
      assert.equal(variable(worker, 'SLUICE__STORE__AWS__CLAIM_CHECK_BUCKETS'), '["shared/team-a/"]', stage);
      const policy = JSON.stringify(taskRolePolicy(stacks, compute, stage));
      const reads = stage === 'ingest' || stage === 'features';
      assert.equal(policy.includes(':s3:::shared/team-a/*'), reads, stage);
      assert.equal(policy.includes(':s3:::shared/*'), false, `${stage} reads nothing else of it`);
      assert.equal(policy.includes(':s3:::shared"'), reads, `${stage} lists the bucket`);
    }
    const folder = synth('beta', { claimCheckBuckets: 'shared/team-b' });
    const policy = JSON.stringify(taskRolePolicy(folder.stacks, folder.compute, 'ingest'));
    assert.ok(policy.includes(':s3:::shared/team-b/*'), 'a prefix is a folder: team-b/, not team-b*');
  });

  it('refuses to synthesize without an environment', () => {
    assert.throws(() => buildStacks(new App()), /-c env=beta or -c env=prod/);
  });
});
