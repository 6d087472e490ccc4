#!/usr/bin/env node
"use strict";
Object.defineProperty(exports, "__esModule", { value: true });
// cdk synth|deploy -c env=beta|prod (see docs/deploy.md).
const aws_cdk_lib_1 = require("aws-cdk-lib");
const app_1 = require("../lib/app");
const app = new aws_cdk_lib_1.App();
(0, app_1.buildStacks)(app, { account: process.env.CDK_DEFAULT_ACCOUNT, region: process.env.CDK_DEFAULT_REGION });
app.synth();
