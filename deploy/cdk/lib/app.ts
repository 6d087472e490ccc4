// The app: for `-c env=beta|prod`, a data stack (stream, queues, tables, bucket) and a compute
// stack (workers, scaling, alarms, fallback), checked by cdk-nag's AwsSolutions rules.
import * as fs from 'fs';
import * as path from 'path';
import { App, Environment, Validations } from 'aws-cdk-lib';
import { AwsSolutionsChecks } from 'cdk-nag';
import { ComputeStack } from './compute-stack';
import { DataStack } from './data-stack';
import { ENVIRONMENTS, EnvironmentConfig } from './environments';
import { REPO_ROOT } from './resources';

/** The model `deploy/sagemaker/train_xgboost.py --out deploy/sagemaker/model` writes. */
export const DEFAULT_FALLBACK_MODEL = path.join(REPO_ROOT, 'deploy', 'sagemaker', 'model', 'model.tar.gz');

export interface SluiceStacks {
  data: DataStack;
  compute: ComputeStack;
}

/**
 * Context: `env` (beta | prod, required), `prefix` (default sluice-<env>; it names the stacks too,
 * `<prefix>-data` and `<prefix>-compute`, so two deployments of one environment can share an
 * account and region; `stacks` names them otherwise), `inference` (gpu |
 * cpu, default gpu), `fallbackModel` (a model.tar.gz, or `none`), `fallbackImage`, `alarmEmail`,
 * `image`/`cudaImage` (image URIs already pushed; default: built from deploy/docker),
 * `recordIdField` (a raw JSON event's id field, `ingest.record_id_field`), `claimCheckBuckets`
 * (producers' buckets claim-checks may point into, comma-separated; ingest and features may read them)
 * and `inlineVectorBytes` (`store.aws.inline_vector_bytes`: larger feature vectors go to S3).
 * `overrides` replace settings of the chosen environment (tests).
 */
export function buildStacks(app: App, env?: Environment, overrides: Partial<EnvironmentConfig> = {}): SluiceStacks {
  // Any AwsSolutions finding not acknowledged (with its reason) beside its construct stops synth.
  Validations.of(app).addPlugins(new AwsSolutionsChecks(app, { verbose: true }));
  const context = (key: string): string | undefined => app.node.tryGetContext(key);
  const name = context('env');
  if (name !== 'beta' && name !== 'prod') {
    throw new Error(`choose an environment: -c env=beta or -c env=prod (got ${JSON.stringify(name)})`);
  }
  const config: EnvironmentConfig = { ...ENVIRONMENTS[name], ...overrides };
  const prefix = context('prefix') ?? `sluice-${name}`;
  const stacks = context('stacks') ?? prefix;
  const inference = context('inference') ?? 'gpu';
  if (inference !== 'gpu' && inference !== 'cpu') throw new Error(`-c inference=gpu|cpu (got ${inference})`);
  const fallbackModel = context('fallbackModel') ?? DEFAULT_FALLBACK_MODEL;
  if (fallbackModel !== 'none' && !fs.existsSync(fallbackModel)) {
    throw new Error(
      `the SageMaker fallback's model ${fallbackModel} does not exist: train it with ` +
        '`python3 deploy/sagemaker/train_xgboost.py --out deploy/sagemaker/model` ' +
        '(pip install -r deploy/sagemaker/requirements.txt), pass -c fallbackModel=PATH, or -c fallbackModel=none',
    );
  }

  const claimCheckBuckets = (context('claimCheckBuckets') ?? '').split(',').map((b) => b.trim()).filter((b) => b);
  for (const entry of claimCheckBuckets) {
    // A bucket, or a bucket and a key prefix in it (one producer's part of a shared bucket).
    const bucket = entry.split('/')[0];
    if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) throw new Error(`-c claimCheckBuckets: ${JSON.stringify(entry)} names no bucket`);
    if (/[*?]/.test(entry)) throw new Error(`-c claimCheckBuckets: ${JSON.stringify(entry)}: a key prefix, not a pattern`);
  }
  const inlineVectorBytes = context('inlineVectorBytes');
  if (inlineVectorBytes !== undefined && !(/^\d+$/.test(String(inlineVectorBytes)) && Number(inlineVectorBytes) <= 380_000)) {
    throw new Error(`-c inlineVectorBytes: ${JSON.stringify(inlineVectorBytes)}: bytes, at most 380000 (a DynamoDB item holds 400 KB)`);
  }
  const recordIdField = context('recordIdField');
  if (recordIdField !== undefined && !/^\S+$/.test(recordIdField)) {
    throw new Error(`-c recordIdField: ${JSON.stringify(recordIdField)} is no field name`);
  }

  const data = new DataStack(app, `${stacks}-data`, {
    env,
    config,
    prefix,
    description: `sluice ${name}: stream, queues, tables and claim-check bucket (prefix ${prefix})`,
    terminationProtection: config.retain,
  });
  const compute = new ComputeStack(app, `${stacks}-compute`, {
    env,
    config,
    data,
    inference,
    images: {
      cpu: { uri: context('image'), dockerfile: 'deploy/docker/Dockerfile' },
      cuda: { uri: context('cudaImage'), dockerfile: 'deploy/docker/Dockerfile.cuda' },
    },
    fallbackModel: fallbackModel === 'none' ? undefined : fallbackModel,
    fallbackImage: context('fallbackImage'),
    alarmEmail: context('alarmEmail'),
    producers: { recordIdField, claimCheckBuckets },
    inlineVectorBytes: inlineVectorBytes === undefined ? undefined : Number(inlineVectorBytes),
    description: `sluice ${name}: the four workers on ECS, their scaling, alarms and the SageMaker fallback`,
    terminationProtection: config.retain,
  });
  compute.addDependency(data);
  return { data, compute };
}
