export * from './agent.js';
export * from './api-key.js';
export * from './billing.js';
export * from './model-override.js';
export * from './project.js';
export * from './provider.js';
export * from './thread.js';
export * from './user.js';
