#!/usr/bin/env node
// cdk synth|deploy -c env=beta|prod (see docs/deploy.md).
import { App } from 'aws-cdk-lib';
import { buildStacks } from '../lib/app';

const app = new App();
buildStacks(app, { account: process.env.CDK_DEFAULT_ACCOUNT, region: process.env.CDK_DEFAULT_REGION });
app.synth();
