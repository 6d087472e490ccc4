"use strict";
Object.defineProperty(exports, "__esModule", { value: true });
exports.ENVIRONMENTS = void 0;
// beta and prod: one app, two sizes (`cdk deploy -c env=beta|prod`).
const aws_cdk_lib_1 = require("aws-cdk-lib");
const aws_logs_1 = require("aws-cdk-lib/aws-logs");
exports.ENVIRONMENTS = {
    beta: {
        name: 'beta',
        shards: 2,
        streamRetention: aws_cdk_lib_1.Duration.hours(24),
        workers: {
            ingest: { cpu: 512, memoryMiB: 1024, minTasks: 1, maxTasks: 2 },
            features: { cpu: 1024, memoryMiB: 2048, minTasks: 1, maxTasks: 4 },
            inference: { cpu: 2048, memoryMiB: 4096, minTasks: 1, maxTasks: 4 },
            results: { cpu: 512, memoryMiB: 1024, minTasks: 1, maxTasks: 2 },
        },
        gpu: { instanceType: 'g4dn.xlarge', maxInstances: 2, cpu: 3584, memoryMiB: 14336 },
        acceptableLatencySeconds: 10,
        reviewBacklogAlarm: 1000,
        natGateways: 1,
        logRetention: aws_logs_1.RetentionDays.ONE_MONTH,
        claimCheckExpiry: aws_cdk_lib_1.Duration.days(7),
        retain: false,
        fallback: { instanceType: 'ml.m5.large', instanceCount: 1 },
    },
    prod: {
        name: 'prod',
        shards: 8,
        streamRetention: aws_cdk_lib_1.Duration.days(7),
        workers: {
            ingest: { cpu: 1024, memoryMiB: 2048, minTasks: 2, maxTasks: 8 },
            features: { cpu: 2048, memoryMiB: 4096, minTasks: 2, maxTasks: 20 },
            inference: { cpu: 4096, memoryMiB: 8192, minTasks: 2, maxTasks: 20 },
            results: { cpu: 1024, memoryMiB: 2048, minTasks: 2, maxTasks: 10 },
        },
        gpu: { instanceType: 'g5.xlarge', maxInstances: 8, cpu: 3584, memoryMiB: 14336 },
        acceptableLatencySeconds: 5,
        reviewBacklogAlarm: 5000,
        natGateways: 2,
        logRetention: aws_logs_1.RetentionDays.ONE_YEAR,
        claimCheckExpiry: aws_cdk_lib_1.Duration.days(30),
        retain: true,
        fallback: { instanceType: 'ml.m5.large', instanceCount: 2 },
    },
};
