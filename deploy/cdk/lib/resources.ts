// What the workers call their AWS resources and which queues each stage uses: read from the one
// file the workers compile in (core/src/backend/aws/resources.json), so the two cannot drift.
// The pipeline's defaults (receives before a DLQ, visibility timeout…) come from
// sluice.example.toml, which a Rust test keeps equal to the workers' own defaults.
import * as fs from 'fs';
import * as path from 'path';

/** The repository root (this file runs from deploy/cdk/build/lib). */
export const REPO_ROOT = path.resolve(__dirname, '..', '..', '..', '..');

export const STAGES = ['ingest', 'features', 'inference', 'results'] as const;
export type Stage = (typeof STAGES)[number];

export type TableName = 'features' | 'results' | 'leases' | 'counters';

export interface TableSpec {
  name: string;
  key: string;
  ttl_attribute?: string;
  /** A global secondary index, both keys strings (the results by status, in store order). */
  index?: { name: string; partition: string; sort: string };
}

export interface StageSpec {
  /** The queue it consumes (ingest reads the stream instead). */
  input: string | null;
  /** The queues it forwards to. */
  sends: string[];
  dlq: string;
}

export interface Resources {
  stream: string;
  queues: Record<string, string>;
  redrive: Record<string, string>;
  tables: Record<TableName, TableSpec>;
  bucket: string;
  claim_check_key_prefix: string;
  /** Where the results stage writes prediction capture objects. */
  capture_key_prefix: string;
  /** Where `sluice monitor` keeps its alert state and reference statistics. */
  monitor_key_prefix: string;
  stages: Record<Stage, StageSpec>;
}

export const RESOURCES: Resources = JSON.parse(
  fs.readFileSync(path.join(REPO_ROOT, 'core', 'src', 'backend', 'aws', 'resources.json'), 'utf8'),
);

/** `<prefix>-<name>`, as the workers' `Names` builds it. */
export function resourceName(prefix: string, name: string): string {
  return `${prefix}-${name}`;
}

/** The defaults of sluice.example.toml, as `section.key` → value (numbers and strings only). */
export function exampleConfig(file = path.join(REPO_ROOT, 'sluice.example.toml')): Map<string, string> {
  const values = new Map<string, string>();
  let section = '';
  for (const raw of fs.readFileSync(file, 'utf8').split('\n')) {
    const line = raw.replace(/#.*$/, '').trim();
    const header = /^\[([a-z_.]+)\]$/.exec(line);
    if (header) {
      section = header[1];
      continue;
    }
    const pair = /^([a-z_]+)\s*=\s*"?([^"]*)"?$/.exec(line);
    if (pair) values.set(`${section}.${pair[1]}`, pair[2]);
  }
  return values;
}

/** One numeric default of sluice.example.toml, or an error naming it. */
export function configNumber(key: string, config = exampleConfig()): number {
  const value = Number(config.get(key));
  if (!Number.isFinite(value)) throw new Error(`sluice.example.toml has no number ${key}`);
  return value;
}
