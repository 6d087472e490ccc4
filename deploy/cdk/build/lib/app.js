"use strict";
var __createBinding = (this && this.__createBinding) || (Object.create ? (function(o, m, k, k2) {
    if (k2 === undefined) k2 = k;
    var desc = Object.getOwnPropertyDescriptor(m, k);
    if (!desc || ("get" in desc ? !m.__esModule : desc.writable || desc.configurable)) {
      desc = { enumerable: true, get: function() { return m[k]; } };
    }
    Object.defineProperty(o, k2, desc);
}) : (function(o, m, k, k2) {
    if (k2 === undefined) k2 = k;
    o[k2] = m[k];
}));
var __setModuleDefault = (this && this.__setModuleDefault) || (Object.create ? (function(o, v) {
    Object.defineProperty(o, "default", { enumerable: true, value: v });
}) : function(o, v) {
    o["default"] = v;
});
var __importStar = (this && this.__importStar) || (function () {
    var ownKeys = function(o) {
        ownKeys = Object.getOwnPropertyNames || function (o) {
            var ar = [];
            for (var k in o) if (Object.prototype.hasOwnProperty.call(o, k)) ar[ar.length] = k;
            return ar;
        };
        return ownKeys(o);
    };
    return function (mod) {
        if (mod && mod.__esModule) return mod;
        var result = {};
        if (mod != null) for (var k = ownKeys(mod), i = 0; i < k.length; i++) if (k[i] !== "default") __createBinding(result, mod, k[i]);
        __setModuleDefault(result, mod);
        return result;
    };
})();
Object.defineProperty(exports, "__esModule", { value: true });
exports.DEFAULT_FALLBACK_MODEL = void 0;
exports.buildStacks = buildStacks;
// The app: for `-c env=beta|prod`, a data stack (stream, queues, tables, bucket) and a compute
// stack (workers, scaling, alarms, fallback), checked by cdk-nag's AwsSolutions rules.
const fs = __importStar(require("fs"));
const path = __importStar(require("path"));
const aws_cdk_lib_1 = require("aws-cdk-lib");
const ecs = __importStar(require("aws-cdk-lib/aws-ecs"));
const cdk_nag_1 = require("cdk-nag");
const compute_stack_1 = require("./compute-stack");
const data_stack_1 = require("./data-stack");
const environments_1 = require("./environments");
const resources_1 = require("./resources");
/** The model `deploy/sagemaker/train_xgboost.py --out deploy/sagemaker/model` writes. */
exports.DEFAULT_FALLBACK_MODEL = path.join(resources_1.REPO_ROOT, 'deploy', 'sagemaker', 'model', 'model.tar.gz');
/**
 * Context: `env` (beta | prod, required), `prefix` (default sluice-<env>), `inference` (gpu |
 * cpu, default gpu), `fallbackModel` (a model.tar.gz, or `none`), `fallbackImage`, `alarmEmail`,
 * `image`/`cudaImage` (image URIs already pushed; default: built from deploy/docker).
 */
function buildStacks(app, env) {
    // Any AwsSolutions finding not acknowledged (with its reason) beside its construct stops synth.
    aws_cdk_lib_1.Validations.of(app).addPlugins(new cdk_nag_1.AwsSolutionsChecks(app, { verbose: true }));
    const context = (key) => app.node.tryGetContext(key);
    const name = context('env');
    if (name !== 'beta' && name !== 'prod') {
        throw new Error(`choose an environment: -c env=beta or -c env=prod (got ${JSON.stringify(name)})`);
    }
    const config = environments_1.ENVIRONMENTS[name];
    const prefix = context('prefix') ?? `sluice-${name}`;
    const inference = context('inference') ?? 'gpu';
    if (inference !== 'gpu' && inference !== 'cpu')
        throw new Error(`-c inference=gpu|cpu (got ${inference})`);
    const fallbackModel = context('fallbackModel') ?? exports.DEFAULT_FALLBACK_MODEL;
    if (fallbackModel !== 'none' && !fs.existsSync(fallbackModel)) {
        throw new Error(`the SageMaker fallback's model ${fallbackModel} does not exist: train it with ` +
            '`python3 deploy/sagemaker/train_xgboost.py --out deploy/sagemaker/model` ' +
            '(pip install -r deploy/sagemaker/requirements.txt), pass -c fallbackModel=PATH, or -c fallbackModel=none');
    }
    const image = (uri, dockerfile) => uri ? ecs.ContainerImage.fromRegistry(uri) : ecs.ContainerImage.fromAsset(resources_1.REPO_ROOT, { file: `deploy/docker/${dockerfile}` });
    const data = new data_stack_1.DataStack(app, `sluice-${name}-data`, {
        env,
        config,
        prefix,
        description: `sluice ${name}: stream, queues, tables and claim-check bucket (prefix ${prefix})`,
        terminationProtection: config.retain,
    });
    const compute = new compute_stack_1.ComputeStack(app, `sluice-${name}-compute`, {
        env,
        config,
        data,
        inference,
        images: { cpu: image(context('image'), 'Dockerfile'), cuda: image(context('cudaImage'), 'Dockerfile.cuda') },
        fallbackModel: fallbackModel === 'none' ? undefined : fallbackModel,
        fallbackImage: context('fallbackImage'),
        alarmEmail: context('alarmEmail'),
        description: `sluice ${name}: the four workers on ECS, their scaling, alarms and the SageMaker fallback`,
        terminationProtection: config.retain,
    });
    compute.addDependency(data);
    return { data, compute };
}
